"""The pool watchers' fault hook: what a test makes a watched pool do when asked for a connection.

:mod:`guardrails.testing` sets :attr:`PoolWatcher.fault <guardrails.pools.PoolWatcher.fault>`;
each adapter consults it inside its timed acquire, before the driver's own (one attribute
read while it is unset). A fault can make the acquire wait, then either let it go on to
the real pool or refuse it with the pool's own timeout exception. The refusal is raised
by :func:`refuse`, which the classifier knows as the pool's own code, so an injected
refusal is an outage by provenance exactly as the driver's would be.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, Protocol

import anyio

if TYPE_CHECKING:
    from guardrails.pools._core import PoolWatcher

__all__ = ["AcquireFault", "inject", "inject_async", "refuse"]


class AcquireFault(Protocol):
    """Decides, for each acquire on a watched pool, what a test wants to happen."""

    def plan(self, watcher: PoolWatcher) -> tuple[float, bool]:
        """``(seconds to wait first, whether the pool then refuses the acquire)``.

        Called on the thread (and in the context) of the acquire: a sync pool's worker
        thread, or the event loop. Must be quick and must not raise.
        """
        ...


def refuse(error: BaseException) -> NoReturn:
    """Raise ``error`` as the watched pool refusing an acquire (the fault's doing)."""
    raise error


def inject(
    watcher: PoolWatcher,
    fault: AcquireFault,
    refusal: Callable[[], BaseException],
    sleep: Callable[[float], object] = time.sleep,
) -> None:
    """Apply ``fault`` to one acquire of a sync pool; ``sleep`` waits as the pool would."""
    delay, refused = fault.plan(watcher)
    if delay > 0:
        sleep(delay)
    if refused:
        refuse(refusal())


async def inject_async(
    watcher: PoolWatcher, fault: AcquireFault, refusal: Callable[[], BaseException]
) -> None:
    """Apply ``fault`` to one acquire of an async pool (the wait can be cancelled)."""
    delay, refused = fault.plan(watcher)
    if delay > 0:
        await anyio.sleep(delay)
    if refused:
        refuse(refusal())
