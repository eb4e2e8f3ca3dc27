"""One outbound call's life: attempts under the origin's breaker and bulkhead, retries, deadline.

A :class:`Call` is made per request and owns everything that belongs to it (the
per-call state stays out of the shared transport). Each attempt waits for a place among
the origin's calls in flight, asks the origin's breaker, and reports the outcome to it.
The retry loop is :mod:`tenacity`'s, driven directly: ``guardrails.retry.retrying``
retries exceptions only, classifies them as database errors, and cannot wait for a
``Retry-After``, all of which an HTTP call needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from guardrails.errors import GuardrailsError
from guardrails.outbound.errors import Refusal
from guardrails.outbound.origin import CLOSED, Origin
from guardrails.outbound.outcome import (
    IDEMPOTENT_METHODS,
    OUTAGE,
    is_outage,
    not_sent,
    retried_after_sending,
    retry_after,
    timeout_phase,
)
from guardrails.outbound.settings import OutboundSettings
from guardrails.retry import backoff

__all__ = ["Call"]


class Call:
    """One request sent through a guarded transport, with its retries."""

    __slots__ = (
        "attempts",
        "deadline",
        "first",
        "idempotent",
        "inner",
        "origin",
        "replayable",
        "request",
        "settings",
        "timeouts",
    )

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        origin: Origin,
        settings: OutboundSettings,
        request: httpx.Request,
        deadline: float | None,
    ) -> None:
        self.inner = inner
        self.origin = origin
        self.settings = settings
        self.request = request
        self.deadline = deadline
        """``anyio.current_time()`` by which the inbound request must be answered, or None."""
        self.idempotent = request.method in IDEMPOTENT_METHODS or (
            "idempotency-key" in request.headers
        )
        # Only a body held in memory can be sent twice; a generator or file is read once.
        self.replayable = isinstance(request.stream, httpx.ByteStream)
        timeouts = request.extensions.get("timeout")
        self.timeouts: dict[str, float | None] | None = (
            dict(timeouts) if deadline is not None and timeouts is not None else None
        )
        self.attempts = 0
        self.first: httpx.Response | BaseException | None = None
        """The first attempt's outcome, when it is worth retrying: replayed to tenacity."""

    async def send(self) -> httpx.Response:
        """Make the call: one attempt, and more only if its outcome is worth retrying.

        The first attempt runs outside tenacity: most calls succeed at once, and building
        a retry loop for each would cost more than the rest of the call's guarding.
        """
        origin = self.origin
        origin.calls_total += 1
        started = anyio.current_time()
        retries = self.settings.retry.attempts > 1
        try:
            if retries:
                origin.budget.record_call()
            try:
                response = await self.attempt()
            except Exception as exc:
                if not retries or not self._worth_retrying(exc):
                    raise
                self.first = exc
            else:
                if not retries or not self._worth_retrying(response):
                    return response
                self.first = response
            # The loop starts from the first outcome (replayed by _again), then retries.
            again: httpx.Response = await self.retrying()(self._again)
            return again
        finally:
            if self.attempts:
                origin.latency.observe(anyio.current_time() - started)

    async def _again(self) -> httpx.Response:
        first, self.first = self.first, None
        if first is None:
            return await self.attempt()
        if isinstance(first, BaseException):
            raise first
        return first

    # -- one attempt -------------------------------------------------------------------

    async def attempt(self) -> httpx.Response:
        """Send the request once, if the origin's breaker, bulkhead and deadline allow."""
        origin = self.origin
        breaker = origin.breaker
        deadline = self.deadline
        if deadline is not None and deadline <= anyio.current_time():
            raise origin.refuse(Refusal.DEADLINE)
        # Refused at once while open, before waiting for a place in the bulkhead.
        trial = origin.admit() if breaker.state != CLOSED else None
        try:
            await origin.enter(deadline)
        except BaseException:
            breaker.release(trial)
            raise
        try:
            if trial is None and breaker.state != CLOSED:
                trial = origin.admit()  # opened while this call waited
        except BaseException:
            origin.leave()
            raise
        capped = self._apply_deadline() if deadline is not None else ()
        self.attempts += 1
        origin.attempts_total += 1
        response: httpx.Response | None = None
        try:
            if deadline is None:
                response = await self.inner.handle_async_request(self.request)
            else:
                with anyio.CancelScope(deadline=deadline):
                    response = await self.inner.handle_async_request(self.request)
        except Exception as exc:
            origin.leave()
            if timeout_phase(exc) in capped:
                breaker.release(trial)  # our deadline's doing, not the origin's
                raise origin.refuse(Refusal.DEADLINE) from exc
            if is_outage(exc, self.settings.breaker.classifiers):
                origin.failures_total += 1
                breaker.record(trial, OUTAGE)
            else:
                breaker.release(trial)  # e.g. our own pool's timeout: says nothing of the origin
            raise
        except BaseException:
            origin.leave()
            breaker.release(trial)
            raise
        if response is None:  # the deadline's cancel scope ended the exchange
            origin.leave()
            breaker.release(trial)
            raise origin.refuse(Refusal.DEADLINE)
        if response.status_code in self.settings.failure_statuses:
            origin.failures_total += 1
            breaker.record(trial, OUTAGE)
        else:
            breaker.record(trial)
        if response.is_closed:
            origin.leave()  # read in full already (e.g. built from bytes): nothing to wait for
        else:
            response.stream = _Body(response.stream, origin, deadline)
        return response

    def _apply_deadline(self) -> tuple[str, ...]:
        """Cap this attempt's timeouts by the time left; return the phases that were cut."""
        assert self.deadline is not None
        left = self.deadline - anyio.current_time()
        request = self.request
        header = self.settings.deadline_header
        if header is not None:
            request.headers[header] = str(max(0, int(left * 1000)))
        timeouts = self.timeouts
        if timeouts is None:
            return ()
        capped = tuple(phase for phase, value in timeouts.items() if value is None or value > left)
        if capped:
            request.extensions["timeout"] = {
                phase: left if phase in capped else value for phase, value in timeouts.items()
            }
        return capped

    # -- retries -----------------------------------------------------------------------

    def retrying(self) -> AsyncRetrying:
        """A fresh tenacity loop for this call: attempts, jitter, Retry-After, deadline."""
        retry = self.settings.retry
        stop: stop_base = stop_after_attempt(retry.attempts)
        if self.deadline is not None:
            # Stops *before* a sleep that would overrun the time left.
            stop = stop | stop_before_delay(max(0.0, self.deadline - anyio.current_time()))
        return AsyncRetrying(
            stop=stop,
            wait=self._wait,
            retry=self._should_retry,
            before_sleep=self._before_sleep,
            retry_error_callback=_last_outcome,
            sleep=backoff,
        )

    def _worth_retrying(self, outcome: httpx.Response | BaseException) -> bool:
        """Whether an attempt that ended so may be tried again (attempts and budget aside)."""
        settings = self.settings
        safe = self.idempotent and self.replayable
        if isinstance(outcome, BaseException):
            if isinstance(outcome, GuardrailsError) or not isinstance(outcome, Exception):
                return False  # refused by guardrails, or cancelled: trying again cannot help
            # Nothing left this process: any method. Otherwise only what is safe to repeat.
            return not_sent(outcome) or (safe and retried_after_sending(outcome))
        if not safe or outcome.status_code not in settings.retry_statuses:
            return False
        wait = retry_after(outcome)
        # Asked to wait longer than a retry may: the caller gets the answer as it is.
        return wait is None or wait <= settings.retry.max_delay

    def _should_retry(self, state: RetryCallState) -> bool:
        outcome = state.outcome
        assert outcome is not None
        if not self._worth_retrying(outcome.exception() or outcome.result()):
            return False
        if state.attempt_number >= self.settings.retry.attempts:
            return False  # out of attempts: not a retry the budget denied
        budget = self.origin.budget
        if budget.can_retry():
            return True
        budget.denied_total += 1
        return False

    def _wait(self, state: RetryCallState) -> float:
        retry = self.settings.retry
        jitter = float(
            wait_random_exponential(multiplier=retry.base_delay, max=retry.max_delay)(state)
        )
        outcome = state.outcome
        if outcome is not None and not outcome.failed:
            asked = retry_after(outcome.result())
            if asked is not None:
                return max(jitter, asked)  # never sooner than the origin asked
        return jitter

    async def _before_sleep(self, state: RetryCallState) -> None:
        origin = self.origin
        origin.budget.record_retry()
        origin.retries_total += 1
        outcome = state.outcome
        if outcome is not None and not outcome.failed:
            await outcome.result().aclose()  # the answer is discarded: free its connection


def _last_outcome(state: RetryCallState) -> Any:
    # Out of attempts or time: the caller gets the last answer (a 503 is an answer) or
    # the last exception, never tenacity's RetryError.
    assert state.outcome is not None
    return state.outcome.result()


class _Body(httpx.AsyncByteStream):
    """A response body that gives the origin's place back when closed, and keeps the deadline.

    Reading past the inbound request's deadline raises ``OriginUnavailable``
    (``deadline``): a body that drips in slowly cannot outlast the request either.
    """

    __slots__ = ("deadline", "inner", "open", "origin")

    def __init__(self, inner: Any, origin: Origin, deadline: float | None) -> None:
        self.inner = inner
        self.origin = origin
        self.deadline = deadline
        self.open = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        deadline = self.deadline
        if deadline is None:
            async for chunk in self.inner:
                yield chunk
            return
        chunks = self.inner.__aiter__()
        while True:
            with anyio.CancelScope(deadline=deadline) as scope:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            if scope.cancelled_caught:
                raise self.origin.refuse(Refusal.DEADLINE)
            yield chunk

    async def aclose(self) -> None:
        if self.open:
            self.open = False
            self.origin.leave()
        await self.inner.aclose()
