"""Guarded database calls: what ``guard.read`` and ``guard.write`` do around the app's function.

A write is refused in read-only mode; every call is gated by the breaker and reports
its outcome to the request's :class:`~guardrails.outcome.Outcome`; a read is retried on
outages and transient errors, within the retry budget and the request's deadline; an
outage that remains becomes :class:`~guardrails.errors.Unavailable`. Outside any request
(a job, startup code) the call is its own little request.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import anyio

from guardrails import context
from guardrails.context import NO_REQUEST
from guardrails.errors import ErrorKind, GuardrailsError, ReadOnly, Unavailable
from guardrails.retry import call_with_retries

if TYPE_CHECKING:
    from guardrails.guard import Guardrails

__all__ = ["guarded", "guarded_call"]

P = ParamSpec("P")
T = TypeVar("T")


def guarded(
    guard: Guardrails, func: Callable[P, Awaitable[T]], *, read: bool
) -> Callable[P, Awaitable[T]]:
    """``func`` wrapped to run as ``guard``'s guarded read (``read=True``) or write."""
    if not callable(func):
        kind = "read" if read else "write"
        raise TypeError(
            f"guard.{kind} wraps an async function, not {func!r}: "
            f"@guard.{kind} above `async def ...`, or guard.{kind}(fetch)(args)"
        )

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return await guarded_call(guard, lambda: func(*args, **kwargs), read=read)

    return wrapper


async def guarded_call(guard: Guardrails, call: Callable[[], Awaitable[T]], *, read: bool) -> T:
    """Run ``call()`` once as ``guard``'s guarded read or write; see the module docstring."""
    ctx = context.current()
    token = None
    if ctx is None:  # a job or startup code: this call is its own little request
        ctx = context.CallContext(NO_REQUEST, guard=guard)
        token = context.enter(ctx)
    outcome = ctx.outcome
    try:
        if not read and guard.read_only:
            retry_after = max(guard.limiter.retry_after, guard.breaker.retry_after)
            raise ReadOnly(
                guard.read_only_reason or "database unavailable", retry_after=retry_after
            )

        async def attempt() -> T:
            trial = outcome.begin_call()
            try:
                result = await call()
            except BaseException as exc:
                outcome.call_failed(trial, exc)
                raise
            outcome.call_succeeded(trial)
            return result

        try:
            if read and guard.retry_settings.attempts > 1:
                time_left = None
                if ctx.deadline is not None:
                    time_left = ctx.deadline - anyio.current_time()
                return await call_with_retries(
                    attempt,
                    guard.retry_settings,
                    guard.retry_budget,
                    guard.classify,
                    time_left=time_left,
                )
            return await attempt()
        except Exception as exc:
            if isinstance(exc, GuardrailsError) or guard.classify(exc) is not ErrorKind.OUTAGE:
                raise
            raise Unavailable(
                "the database is unavailable", retry_after=max(1, guard.breaker.retry_after)
            ) from exc
    finally:
        if token is not None:
            outcome.abandon()  # a pool timeout it caught itself still counts
            context.leave(token)
