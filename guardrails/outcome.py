"""What one request (or one guarded call outside a request) proved about the database.

Every record or release of the breaker for a request goes through its
:class:`Outcome`, so each failure counts once, a half-open trial is decided or given
back exactly once, and a pool timeout the app caught itself still counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guardrails.breaker import Trial
from guardrails.errors import ErrorKind, GuardrailsError, in_chain

if TYPE_CHECKING:
    from guardrails.guard import Guardrails

__all__ = ["Outcome"]


class Outcome:
    """The breaker bookkeeping of one request: its trial, failures, pool timeouts.

    - ``trial``: the half-open trial the request holds, if any;
    - ``recorded``: whether a verdict reached the breaker already (a guarded call's);
    - ``failure``: the last exception recorded, so the same one never counts twice;
    - ``pool_timeout``: a watched pool's timeout not yet recorded;
    - ``reached``: whether a watched pool handed the request a connection.

    :meth:`finish`, :meth:`fail` and :meth:`abandon` end it; each is safe to call
    twice, and after one of them the others do nothing more.
    """

    __slots__ = (
        "_route",
        "failure",
        "finished",
        "guard",
        "pool",
        "pool_timeout",
        "reached",
        "recorded",
        "timed_out",
        "trial",
    )

    def __init__(
        self, guard: Guardrails, trial: Trial | None = None, *, route: str | None = None
    ) -> None:
        self.guard = guard
        self._route = route
        self.trial = trial
        self.recorded = False
        self.failure: BaseException | None = None
        self.pool_timeout: BaseException | None = None
        self.pool: str | None = None
        """The name of the watched pool that last timed out in this request, for logs."""
        self.reached = False
        self.timed_out = False
        """Whether a watched pool timed out on this request (kept once recorded)."""
        self.finished = False

    # -- what pool watchers report -------------------------------------------------------

    def reached_database(self) -> None:
        """A watched pool handed this request a connection."""
        self.reached = True

    def pool_timed_out(self, exc: BaseException, pool: str | None = None) -> None:
        """A watched pool (named ``pool``) gave up on this request: recorded once, when
        the request ends."""
        self.pool_timeout = exc
        self.pool = pool
        self.timed_out = True

    @property
    def healthy(self) -> bool:
        """Nothing failed so far: no failure recorded, no pool timed out."""
        return self.failure is None and not self.timed_out

    # -- guarded calls (guard.read / guard.write) ----------------------------------------

    def begin_call(self) -> Trial | None:
        """Admit one guarded call: it is the request's trial if the request holds one."""
        held = self.trial
        if held is not None and not held.done:
            return held
        return self.guard.breaker.admit()

    def call_failed(self, trial: Trial | None, exc: BaseException) -> None:
        """A guarded call admitted with ``trial`` raised ``exc``: record it, once."""
        pending = self.pool_timeout
        timed_out = pending is not None and in_chain(exc, pending)
        if timed_out:
            self.pool_timeout = None
        pool = self.pool if timed_out else None
        self.guard.breaker.record(trial, exc, route=self.route(), pool=pool)
        self.recorded = True
        self.failure = exc
        self.guard.note_failure(exc)

    def call_succeeded(self, trial: Trial | None) -> None:
        """A guarded call returned; a pool timeout it caught itself is still an outage."""
        pending, self.pool_timeout = self.pool_timeout, None
        if pending is None:
            self.guard.breaker.record(trial)
        else:
            self.guard.breaker.record(trial, pending, route=self.route(), pool=self.pool)
        self.recorded = True

    # -- how the request ends ------------------------------------------------------------

    def fail(self, exc: BaseException) -> ErrorKind:
        """The request ended with ``exc`` from the app; returns its kind.

        A failure a guarded call already recorded is not counted again. The app's own
        error proves the database answered only when the request reached it and
        nothing else in the request said otherwise.
        """
        guard = self.guard
        kind = guard.classify(exc)
        if self.finished:
            return kind
        failure = self.failure
        counted = (failure is not None and in_chain(exc, failure)) or (
            self.recorded and isinstance(exc, GuardrailsError)
        )
        if not counted:
            pending = self.pool_timeout
            pool = None
            if pending is not None and in_chain(exc, pending):
                pending = self.pool_timeout = None
                pool = self.pool
            if kind is ErrorKind.OUTAGE or (self._proves() and not self.recorded and not pending):
                guard.breaker.record(self._live(), exc, route=self.route(), pool=pool)
            guard.note_failure(exc)
            self.failure = exc
        self.recorded = True
        self.finish()
        return kind

    def abandon(self) -> None:
        """The request ended without a verdict (cancelled, past its deadline, refused).

        The trial goes back undecided; a pool timeout seen on the way still counts.
        """
        self.recorded = True
        self.finish()

    def finish(self) -> None:
        """Tell the breaker what the request proved, and give back what it holds."""
        if self.finished:
            return
        self.finished = True
        breaker = self.guard.breaker
        live = self._live()
        pending, self.pool_timeout = self.pool_timeout, None
        if pending is not None:
            route = self.route()
            if live is not None:
                breaker.record(live, pending, route=route, pool=self.pool)
            else:
                breaker.record_outage(pending, route=route, pool=self.pool)
        elif not self.recorded and (live is not None or breaker.counting):
            if self._proves():
                breaker.record(live)
            else:
                breaker.record_unproven(live)
        breaker.release(self.trial)

    def route(self) -> str | None:
        """The route template of the request this outcome belongs to, if known."""
        return self._route

    def _live(self) -> Trial | None:
        trial = self.trial
        return trial if trial is not None and not trial.done else None

    def _proves(self) -> bool:
        # With a watched pool, only a request that got a connection proves anything.
        return self.reached or not self.guard.watching
