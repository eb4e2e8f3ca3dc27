"""The circuit breaker in front of the database: stop calling a pool that cannot serve.

- :mod:`~guardrails.breaker.machine`: :class:`Breaker`, the state machine, and its
  :class:`Trial`;
- :mod:`~guardrails.breaker.settings`: :class:`BreakerSettings`, when it opens and how
  it tests recovery;
- :mod:`~guardrails.breaker.state`: :class:`BreakerState`, the outage record, and how a
  transition is logged and told to listeners;
- :mod:`~guardrails.breaker.probe`: the probe's cadence while the breaker is open;
- :mod:`~guardrails.breaker._pybreaker`: pybreaker, which keeps the state and the count.
"""

from guardrails.breaker.machine import Breaker, Trial
from guardrails.breaker.settings import BreakerSettings
from guardrails.breaker.settings import Probe as Probe
from guardrails.breaker.state import CLOSED as CLOSED
from guardrails.breaker.state import HALF_OPEN as HALF_OPEN
from guardrails.breaker.state import OPEN as OPEN
from guardrails.breaker.state import BreakerState, describe_outage
from guardrails.breaker.state import StateListener as StateListener

__all__ = ["Breaker", "BreakerSettings", "BreakerState", "Trial", "describe_outage"]
