"""One breaker state for a fleet: an opening anywhere opens it everywhere, one process tests.

Redis holds the current opening (``scripts/open.lua``), and every opening and closing is
published on a channel; each lease renewal also reports the opening on record, which
catches a missed message. When the open period ends, the process holding the trial lock
(``scripts/trial.lua``) makes the half-open trial, and its success closes the breaker
for everyone, but only the opening it answers for (``scripts/close.lua``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from guardrails.breaker import CLOSED, HALF_OPEN, OPEN
from guardrails.coordination.lua import Keys, Scripts, text

if TYPE_CHECKING:
    from guardrails.breaker import Breaker

__all__ = ["SharedBreaker"]

_TRIAL_CHECK = 0.2
"""Seconds between two attempts at the trial lock once the open period is over."""


class SharedBreaker:
    """This process's breaker, kept in step with the others' through Redis.

    Local changes become news for Redis (:attr:`pending`, told by :meth:`tell`); the
    others' news arrives through :meth:`on_message` and :meth:`reconcile`. While the
    breaker is open or another process holds the trial lock, ``breaker.hold`` keeps
    this process from making a trial of its own.
    """

    __slots__ = (
        "_applying",
        "_next_trial_check",
        "_source_open",
        "_wake",
        "breaker",
        "keys",
        "opening",
        "pending",
        "process_id",
        "publish",
        "remote_opens",
        "trial_owner",
    )

    def __init__(
        self,
        breaker: Breaker,
        process_id: str,
        keys: Keys,
        wake: Callable[[], None],
        *,
        publish: str = "PUBLISH",
    ) -> None:
        self.breaker = breaker
        self.publish = publish
        """The command news goes out with: ``SPUBLISH`` on a Redis Cluster."""
        self.process_id = process_id
        self.keys = keys
        self._wake = wake
        self.opening: str | None = None
        """The shared breaker key's value this process last saw: the opening it may close."""
        self.pending: str | None = None
        """Breaker news not yet told to Redis: "open", "reopen" (an opening Redis lost,
        told again) or "closed" (the latest wins)."""
        self.trial_owner = False
        """This process holds the trial lock."""
        self.remote_opens = 0
        """Times another process's news opened this process's breaker."""
        self._applying = False
        self._source_open = False
        self._next_trial_check = 0.0
        breaker.add_listener(self._changed)

    def _changed(self, old: str | None, new: str, snapshot: dict[str, Any]) -> None:
        if self._applying:
            return  # news from Redis: nothing to tell
        if new == OPEN:
            self._source_open = True
            self.pending = "open"
        elif new == CLOSED:
            self._source_open = False
            self.pending = "closed"
        else:
            return
        self.trial_owner = False
        self._wake()

    async def tell(self, scripts: Scripts) -> None:
        """Tell Redis (and through it everyone) the news in :attr:`pending`, if any."""
        kind = self.pending
        if kind is None:
            return
        if kind in ("open", "reopen"):
            period = int(self.breaker.opened_remaining() * 1000)
            linger = int((self.breaker.settings.reset_timeout + 30.0) * 1000)
            written = await scripts.run(
                "open",
                self.keys.for_news,
                [
                    period,
                    linger,
                    self.process_id,
                    "1" if kind == "reopen" else "0",
                    self.publish,
                ],
            )
            if written is not None:
                self.opening = text(written)
        else:
            await scripts.run(
                "close", self.keys.for_news, [self.process_id, self.opening or "", self.publish]
            )
        if self.pending == kind:
            self.pending = None

    def _apply_open(self, remaining: float) -> None:
        breaker = self.breaker
        self._applying = True
        try:
            if breaker.state == CLOSED:
                self.remote_opens += 1
            breaker.force_open(remaining)
        finally:
            self._applying = False
        breaker.hold = True
        self.trial_owner = False

    def _apply_close(self) -> None:
        breaker = self.breaker
        self._applying = True
        try:
            breaker.force_close()
        finally:
            self._applying = False
        breaker.hold = False
        self._source_open = False
        self.trial_owner = False

    def reconcile(self, remaining_ms: int, opening: str) -> None:
        """The renewal's view of the shared breaker: catches a missed pub/sub message.

        ``remaining_ms`` is what is left of the open period on record (-1: no opening on
        record), ``opening`` the breaker key's value. While news of ours is pending, the
        answer is older than it (e.g. a trial closed the breaker while the renewal was on
        its way): it is told first, and the next renewal reconciles.
        """
        if self.pending is not None:
            return
        state = self.breaker.state
        if remaining_ms >= 0:
            if state != HALF_OPEN:
                # A running trial answers for the opening it started under, not a newer one.
                self.opening = opening
            if state == CLOSED:
                self._apply_open(remaining_ms / 1000)
        elif state != CLOSED:
            if self._source_open:
                # Redis lost the news (restarted): tell it again, unless another
                # process has told it of a newer opening meanwhile.
                self.pending = "reopen"
            elif not self.trial_owner:
                self._apply_close()

    async def coordinate_trial(self, scripts: Scripts) -> None:
        """Once the open period is over, let only the holder of the trial lock make a trial."""
        breaker = self.breaker
        if breaker.state == CLOSED:
            breaker.hold = False
            self.trial_owner = False
            return
        if breaker.state == OPEN and breaker.opened_remaining() > 0:
            breaker.hold = True
            self.trial_owner = False
            return
        # The open period is over (or our trial is running): one process tests.
        now = time.monotonic()
        if now < self._next_trial_check:
            return
        self._next_trial_check = now + _TRIAL_CHECK
        running = breaker.state == HALF_OPEN
        lock_ttl = int(max(1.0, breaker.settings.probe_timeout + 0.5) * 1000)
        owner = await scripts.run(
            "trial", [self.keys.trial], [self.process_id, lock_ttl, "1" if running else "0"]
        )
        self.trial_owner = bool(int(owner))
        breaker.hold = not self.trial_owner

    def on_message(self, data: object) -> None:
        """Apply another process's news from the channel ("open <ms> <sender> <opening>")."""
        if not isinstance(data, bytes | str):
            return  # a client with decode_responses=True hands over str
        kind, _, rest = text(data).partition(" ")
        amount, _, rest = rest.partition(" ")
        sender, _, opening = rest.partition(" ")
        if sender == self.process_id:
            return
        if kind == "open" and amount.isdigit():
            self.opening = opening or None
            self._apply_open(int(amount) / 1000)
        elif kind == "closed" and self.breaker.state != CLOSED:
            self._apply_close()

    def lost(self) -> None:
        """Redis is unreachable: this process's breaker decides alone."""
        self.trial_owner = False
        self.breaker.hold = False
