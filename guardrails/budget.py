"""The connection budget: how many database connections each app process may hold.

Pure arithmetic with exact numbers, the explanation of it in words, and the checks that
turn a pool size that does not fit into a :class:`~guardrails.errors.BudgetExceeded`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from guardrails.errors import BudgetExceeded

__all__ = ["ConnectionBudget", "ServerlessPlan"]

_POOLER = (
    "put a connection pooler (PgBouncer, or a managed proxy such as RDS Proxy) in front "
    "so that many instances share few database connections"
)


class _Consumers(Mapping[str, int]):
    # A read-only mapping that, unlike MappingProxyType, hashes, pickles and deep-copies,
    # so the frozen budget stays hashable and works with dataclasses.asdict and copy.
    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, int]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> int:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self._data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}es"


def _pool(pool_size: int, max_overflow: int) -> int:
    if not _is_int(pool_size) or pool_size < 1:
        raise ValueError(f"pool_size must be a whole number of connections >= 1, not {pool_size!r}")
    if not _is_int(max_overflow) or max_overflow < 0:
        raise ValueError(
            f"max_overflow must be a whole number of connections >= 0, not {max_overflow!r}"
        )
    return pool_size + max_overflow


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _decimal(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6f}".rstrip("0").rstrip(".")


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    """How many database connections each app process may hold, and why.

    ``usable = max_connections - reserved``; ``app_total = floor((usable - sum of
    other_consumers) x target_utilization)``; ``per_process = app_total // processes``::

        budget = ConnectionBudget(max_connections=100, reserved=10,
                                  target_utilization=0.7, processes=4)
        budget.usable, budget.app_total, budget.per_process   # 90, 63, 15

    ``reserved`` counts connections the app can never get (PostgreSQL's
    ``superuser_reserved_connections``, admin slots); ``other_consumers`` names other
    clients of the same database (``{"jobs": 5, "admin": 3}``); ``target_utilization``
    (above 0, at most 1) is the share of the rest the app may use, the remainder being
    headroom for deploy overlap, migrations and admin sessions; ``processes`` counts
    everything that opens its own pool (workers x replicas, or peak serverless instances).

    A bad configuration fails at construction: :class:`ValueError` for a value out of
    range, :class:`~guardrails.errors.BudgetExceeded` (also a ``ValueError``) when the
    numbers leave less than one connection per process. Every message says what to
    change. ``target_utilization`` is taken as the decimal it is written as, so
    ``90 x 0.7`` is exactly 63, not the 62.99999999999999 of binary floating point.
    Use :func:`dataclasses.replace` for a copy with, say, a different process count.
    """

    max_connections: int
    reserved: int = 0
    target_utilization: float = 0.7
    processes: int = 1
    other_consumers: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate_fields()
        consumers = _Consumers(self.other_consumers)
        # Frozen: the normalised values must go in through object.__setattr__.
        object.__setattr__(self, "other_consumers", consumers)
        object.__setattr__(self, "target_utilization", float(self.target_utilization))
        remaining = self._remaining
        if remaining < 1:
            taken = ", ".join(f"{name} {count}" for name, count in consumers.items())
            raise BudgetExceeded(
                f"other_consumers ({taken}: {sum(consumers.values())} in total) take all "
                f"{self.usable} usable connections ({self.max_connections} max_connections"
                f" - {self.reserved} reserved), leaving nothing for the app: lower "
                "other_consumers or reserved, or raise max_connections"
            )
        if self.app_total // self.processes < 1:
            raise BudgetExceeded(self._too_many_processes_message())

    @property
    def usable(self) -> int:
        """Connections anyone but superusers may open: ``max_connections - reserved``."""
        return self.max_connections - self.reserved

    @property
    def app_total(self) -> int:
        """Connections all the app's processes together may hold."""
        return math.floor(self._remaining * self._utilization)

    @property
    def per_process(self) -> int:
        """Connections one process may hold: its concurrency limit and its largest pool.

        Always at least 1; a configuration that gives less fails at construction.
        """
        return self.app_total // self.processes

    def check(self, pool_size: int, *, max_overflow: int = 0) -> None:
        """Raise :class:`~guardrails.errors.BudgetExceeded` unless a pool of this size fits.

        ``pool_size + max_overflow`` (SQLAlchemy's names; other pools: their maximum size)
        must be at most :attr:`per_process`. The message shows the arithmetic and the
        changes that would make it fit.
        """
        pool = _pool(pool_size, max_overflow)
        if pool <= self.per_process:
            return
        what = "pool_size" if max_overflow == 0 else "pool_size + max_overflow"
        fixes = [f"set {what} to at most {self.per_process}"]
        fitting = self.max_processes(pool_size, max_overflow=max_overflow)
        if fitting >= 1:
            fixes.append(f"run at most {_plural(fitting, 'process')} with this pool")
        fixes.append(
            f"raise max_connections to at least {self._max_connections_for(pool * self.processes)}"
        )
        raise BudgetExceeded(
            f"pool_size {pool_size} (+ max_overflow {max_overflow}) per process"
            f" x {_plural(self.processes, 'process')} = {pool * self.processes} connections,"
            f" but the budget allows {self.per_process} per process ({self.app_total} in total"
            f" = {self._formula()}). {_sentence(', '.join(fixes[:-1]))}, or {fixes[-1]}."
        )

    def max_processes(self, pool_size: int, *, max_overflow: int = 0) -> int:
        """How many processes (or serverless instances) with this pool fit the budget.

        ``app_total // (pool_size + max_overflow)``, whatever :attr:`processes` says;
        0 when even one such pool is too big.
        """
        return self.app_total // _pool(pool_size, max_overflow)

    def serverless(self, peak_instances: int) -> ServerlessPlan:
        """The pool size per instance if ``peak_instances`` share this budget's app total.

        For serverless platforms, where each instance opens its own pool and the count
        at peak multiplies it (50 instances x pool 5 = 250 connections). Unlike a budget
        built with ``processes=peak_instances``, this never raises for too many
        instances: the plan's ``pool_size`` is then 0 and its ``warning`` says to put a
        connection pooler in front.
        """
        if not _is_int(peak_instances) or peak_instances < 1:
            raise ValueError(
                f"peak_instances must be a whole number >= 1, not {peak_instances!r}: "
                "count the instances running at once at peak"
            )
        pool_size = self.app_total // peak_instances
        warning = None
        if pool_size < 1:
            warning = (
                f"{peak_instances} instances cannot each hold a connection: the budget has "
                f"{self.app_total} ({self._formula()}). Cap the platform's concurrency at "
                f"{self.app_total} instances, or {_POOLER}"
            )
        return ServerlessPlan(
            instances=peak_instances,
            pool_size=pool_size,
            total=peak_instances * pool_size,
            app_total=self.app_total,
            warning=warning,
        )

    def explain(self) -> str:
        """The arithmetic step by step, in words, ending with what to configure."""
        rows: list[tuple[str, str, str, str]] = [
            ("", str(self.max_connections), "max_connections", "the database's limit"),
            ("-", str(self.reserved), "reserved", "kept for superusers and admin tools"),
            ("=", str(self.usable), "usable", ""),
        ]
        if self.other_consumers:
            for name, count in self.other_consumers.items():
                rows.append(("-", str(count), name, "another consumer of the database"))
            rows.append(("=", str(self._remaining), "left for this app", ""))
        headroom = self._remaining - self.app_total
        rows.append(
            (
                "x",
                self._utilization_text(),
                "target_utilization",
                f"{headroom} kept free as headroom for deploy overlap, migrations and "
                "admin sessions",
            )
        )
        exact_total = self._remaining * self._utilization
        rows.append(
            (
                "=",
                str(self.app_total),
                "app total",
                ""
                if exact_total.denominator == 1
                else f"rounded down from {_decimal(exact_total)}",
            )
        )
        rows.append(
            ("/", str(self.processes), "processes", "workers x replicas, or serverless instances")
        )
        exact_share = Fraction(self.app_total, self.processes)
        rows.append(
            (
                "=",
                str(self.per_process),
                "per process",
                ""
                if exact_share.denominator == 1
                else f"rounded down from {_decimal(exact_share)}",
            )
        )
        width = max(len(value) for _, value, _, _ in rows)
        label_width = max(len(label) for _, _, label, _ in rows)
        lines = ["Connection budget:"]
        for op, value, label, note in rows:
            lines.append(f"  {op:1} {value:>{width}}  {label:<{label_width}}  {note}".rstrip())
        cap = self.per_process
        lines += [
            "",
            f"Per-process cap: {cap} connection{'' if cap == 1 else 's'}.",
            f"Set each process's concurrency limit to {cap} (Guardrails(budget=...) does) and",
            f"its pool size (pool_size + max_overflow) to at most {cap}, so that a request",
            "admitted by the limiter always finds a connection.",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The settings and the derived numbers as JSON-ready plain data."""
        return {
            "max_connections": self.max_connections,
            "reserved": self.reserved,
            "other_consumers": dict(self.other_consumers),
            "target_utilization": self.target_utilization,
            "processes": self.processes,
            "usable": self.usable,
            "app_total": self.app_total,
            "per_process": self.per_process,
        }

    # -- private helpers ----------------------------------------------------------------

    @property
    def _remaining(self) -> int:
        return self.usable - sum(self.other_consumers.values())

    @property
    def _utilization(self) -> Fraction:
        # repr() is the shortest decimal that round-trips, i.e. what the user wrote:
        # Fraction("0.7") is 7/10 where Fraction(0.7) is 0.6999999999999999555...
        return Fraction(repr(self.target_utilization))

    def _utilization_text(self) -> str:
        text = repr(self.target_utilization)
        return text[:-2] if text.endswith(".0") else text

    def _formula(self) -> str:
        terms = [f"{self.max_connections} max_connections"]
        if self.reserved:
            terms.append(f"{self.reserved} reserved")
        terms += [f"{count} {name}" for name, count in self.other_consumers.items() if count]
        inner = " - ".join(terms)
        if len(terms) > 1:
            inner = f"({inner})"
        return f"floor({inner} x {self._utilization_text()} target utilization)"

    def _max_connections_for(self, needed: int) -> int:
        # floor(x) >= n exactly when x >= n for a whole n, so solve (m - taken) * u >= n.
        taken = self.reserved + sum(self.other_consumers.values())
        return taken + math.ceil(needed / self._utilization)

    def _too_many_processes_message(self) -> str:
        fixes = []
        if self.app_total >= 1:
            fixes.append(f"run at most {_plural(self.app_total, 'process')}")
        fixes.append(
            f"raise max_connections to at least {self._max_connections_for(self.processes)}"
        )
        if self.reserved or self.other_consumers:
            fixes.append("lower reserved or other_consumers")
        fixes.append(_POOLER)
        return (
            f"{self.app_total} connections ({self._formula()}) shared by "
            f"{_plural(self.processes, 'process')} is less than 1 per process: "
            f"{', '.join(fixes[:-1])}, or {fixes[-1]}"
        )

    def _validate_fields(self) -> None:
        if not _is_int(self.max_connections) or self.max_connections < 1:
            raise ValueError(
                f"max_connections must be a whole number >= 1, not {self.max_connections!r}: "
                "set it to the database's connection limit (PostgreSQL: SHOW max_connections)"
            )
        if not _is_int(self.reserved) or self.reserved < 0:
            raise ValueError(
                f"reserved must be a whole number >= 0, not {self.reserved!r}: set it to the "
                "connections kept for superusers and admin tools (PostgreSQL: "
                "superuser_reserved_connections, 3 by default)"
            )
        if self.reserved >= self.max_connections:
            raise ValueError(
                f"reserved ({self.reserved}) must be smaller than max_connections "
                f"({self.max_connections}): lower reserved or raise max_connections"
            )
        utilization: object = self.target_utilization
        if (
            isinstance(utilization, bool)
            or not isinstance(utilization, (int, float))
            or not math.isfinite(utilization)
            or not 0 < utilization <= 1
        ):
            raise ValueError(
                f"target_utilization must be a number above 0 and at most 1, not "
                f"{utilization!r}: it is the share of the usable connections the app may "
                "use (0.7 leaves 30% headroom for deploy overlap, migrations and admin sessions)"
            )
        if not _is_int(self.processes) or self.processes < 1:
            raise ValueError(
                f"processes must be a whole number >= 1, not {self.processes!r}: count "
                "everything that opens its own pool (workers x replicas, or peak "
                "serverless instances)"
            )
        if not isinstance(self.other_consumers, Mapping):
            raise ValueError(
                "other_consumers must be a mapping of name to connections, e.g. "
                f'{{"jobs": 5, "admin": 3}}, not {self.other_consumers!r}'
            )
        for name, count in self.other_consumers.items():
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"other_consumers names must be non-empty strings, not {name!r}: "
                    "name each consumer, e.g. 'jobs'"
                )
            if not _is_int(count) or count < 0:
                raise ValueError(
                    f"other_consumers[{name!r}] must be a whole number of connections >= 0, "
                    f"not {count!r}: set it to the most connections {name!r} holds at once"
                )


@dataclass(frozen=True, slots=True)
class ServerlessPlan:
    """What a connection budget allows each instance when many serverless instances share it.

    Made by :meth:`ConnectionBudget.serverless`.
    """

    instances: int
    """Peak number of instances running at once, each with its own pool."""
    pool_size: int
    """Largest pool per instance that keeps ``instances x pool_size`` within the budget."""
    total: int
    """Connections held at peak with that pool size: ``instances x pool_size``."""
    app_total: int
    """The budget's :attr:`ConnectionBudget.app_total`."""
    warning: str | None
    """Set when ``pool_size`` is 0: the instances need a pooler in front of the database."""
