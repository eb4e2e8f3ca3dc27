"""ConnectionBudget: the arithmetic, its validation, check(), explain() and the serverless view."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import re

import pytest

from guardrails.budget import ConnectionBudget, ServerlessPlan
from guardrails.errors import BudgetExceeded, GuardrailsError


def _design_example() -> ConnectionBudget:
    return ConnectionBudget(max_connections=100, reserved=10, target_utilization=0.7, processes=4)


def test_design_example_numbers() -> None:
    budget = _design_example()
    assert (budget.usable, budget.app_total, budget.per_process) == (90, 63, 15)


def test_utilization_is_exact_where_binary_floats_round_down() -> None:
    # The trap this guards against: in binary floating point 90 * 0.7 is just below 63.
    assert 90 * 0.7 == 62.99999999999999
    budget = ConnectionBudget(max_connections=90, target_utilization=0.7)
    assert budget.app_total == 63
    assert budget.per_process == 63
    # Same trap with other numbers: 100 * 0.29 is 28.999999999999996 in floats.
    assert ConnectionBudget(max_connections=100, target_utilization=0.29).app_total == 29


def test_defaults() -> None:
    budget = ConnectionBudget(max_connections=100)
    assert budget.reserved == 0
    assert budget.target_utilization == 0.7
    assert budget.processes == 1
    assert dict(budget.other_consumers) == {}
    assert (budget.usable, budget.app_total, budget.per_process) == (100, 70, 70)


def test_other_consumers_come_off_the_usable_total() -> None:
    budget = ConnectionBudget(
        max_connections=100,
        reserved=3,
        processes=4,
        other_consumers={"jobs": 5, "admin": 3},
    )
    assert budget.usable == 97
    # floor((97 - 8) * 0.7) = floor(62.3) = 62; 62 // 4 = 15
    assert (budget.app_total, budget.per_process) == (62, 15)


def test_other_consumers_are_stored_immutably() -> None:
    source = {"jobs": 5}
    budget = ConnectionBudget(max_connections=100, other_consumers=source)
    source["jobs"] = 50
    assert budget.other_consumers["jobs"] == 5
    with pytest.raises(TypeError):
        budget.other_consumers["jobs"] = 1  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        budget.processes = 2  # type: ignore[misc]


def test_equal_budgets_are_equal_hash_alike_and_copy() -> None:
    one = ConnectionBudget(max_connections=100, other_consumers={"jobs": 5, "admin": 3})
    two = ConnectionBudget(max_connections=100, other_consumers={"admin": 3, "jobs": 5})
    assert one == two
    assert hash(one) == hash(two)
    assert len({one, two}) == 1
    assert one != ConnectionBudget(max_connections=100, other_consumers={"jobs": 6, "admin": 3})
    assert pickle.loads(pickle.dumps(one)) == one
    assert copy.deepcopy(one) == one
    assert dataclasses.replace(one, processes=2).processes == 2


@pytest.mark.parametrize(
    ("kwargs", "phrases"),
    [
        ({"max_connections": 0}, ["max_connections", ">= 1", "not 0", "SHOW max_connections"]),
        ({"max_connections": "100"}, ["max_connections", "whole number", "'100'"]),
        ({"max_connections": True}, ["max_connections", "whole number", "True"]),
        ({"max_connections": 100, "reserved": -1}, ["reserved", ">= 0", "not -1"]),
        (
            {"max_connections": 100, "reserved": 120},
            [
                "reserved (120) must be smaller than max_connections (100)",
                "lower reserved or raise max_connections",
            ],
        ),
        (
            {"max_connections": 100, "target_utilization": 1.5},
            ["target_utilization", "above 0 and at most 1", "not 1.5", "0.7 leaves 30% headroom"],
        ),
        ({"max_connections": 100, "target_utilization": 0}, ["target_utilization", "not 0"]),
        (
            {"max_connections": 100, "target_utilization": float("nan")},
            ["target_utilization", "not nan"],
        ),
        (
            {"max_connections": 100, "processes": 0},
            ["processes", ">= 1", "not 0", "workers x replicas"],
        ),
        (
            {"max_connections": 100, "other_consumers": {"jobs": -5}},
            ["other_consumers['jobs']", ">= 0", "not -5"],
        ),
        (
            {"max_connections": 100, "other_consumers": {"": 5}},
            ["other_consumers names", "non-empty"],
        ),
        (
            {"max_connections": 100, "other_consumers": [("jobs", 5)]},
            ["other_consumers must be a mapping", '{"jobs": 5, "admin": 3}'],
        ),
    ],
)
def test_validation_names_the_field_and_what_to_change(
    kwargs: dict[str, object], phrases: list[str]
) -> None:
    with pytest.raises(ValueError, match="must") as info:
        ConnectionBudget(**kwargs)  # type: ignore[arg-type]
    assert not isinstance(info.value, BudgetExceeded)
    for phrase in phrases:
        assert phrase in str(info.value)


def test_less_than_one_connection_per_process_fails_at_construction() -> None:
    with pytest.raises(BudgetExceeded) as info:
        ConnectionBudget(max_connections=100, reserved=10, processes=64)
    message = str(info.value)
    assert isinstance(info.value, GuardrailsError)
    assert isinstance(info.value, ValueError)
    assert (
        "63 connections (floor((100 max_connections - 10 reserved) x 0.7 target utilization))"
        " shared by 64 processes is less than 1 per process" in message
    )
    assert "run at most 63 processes" in message
    # (m - 10) * 0.7 >= 64  <=>  m >= 10 + ceil(64 / 0.7) = 10 + 92
    assert "raise max_connections to at least 102" in message
    assert "lower reserved or other_consumers" in message
    assert "PgBouncer" in message
    ConnectionBudget(max_connections=102, reserved=10, processes=64)  # the advice holds
    ConnectionBudget(max_connections=100, reserved=10, processes=63)


def test_app_total_of_zero_fails_without_suggesting_zero_processes() -> None:
    with pytest.raises(BudgetExceeded) as info:
        ConnectionBudget(max_connections=2, reserved=1, target_utilization=0.5)
    message = str(info.value)
    assert message.startswith("0 connections (floor((2 max_connections - 1 reserved) x 0.5")
    assert "run at most" not in message
    assert "raise max_connections to at least 3" in message


def test_other_consumers_taking_everything_fail_at_construction() -> None:
    with pytest.raises(BudgetExceeded) as info:
        ConnectionBudget(max_connections=10, reserved=2, other_consumers={"jobs": 5, "cron": 3})
    assert str(info.value) == (
        "other_consumers (jobs 5, cron 3: 8 in total) take all 8 usable connections "
        "(10 max_connections - 2 reserved), leaving nothing for the app: lower "
        "other_consumers or reserved, or raise max_connections"
    )


def test_check_passes_when_the_pool_fits() -> None:
    budget = _design_example()
    budget.check(pool_size=15)
    budget.check(pool_size=10, max_overflow=5)
    budget.check(pool_size=1)


def test_check_fails_with_the_arithmetic_and_the_fixes() -> None:
    with pytest.raises(BudgetExceeded) as info:
        _design_example().check(pool_size=20)
    assert str(info.value) == (
        "pool_size 20 (+ max_overflow 0) per process x 4 processes = 80 connections, but the "
        "budget allows 15 per process (63 in total = floor((100 max_connections - 10 reserved)"
        " x 0.7 target utilization)). Set pool_size to at most 15, run at most 3 processes "
        "with this pool, or raise max_connections to at least 125."
    )
    # The suggested max_connections is the smallest that works.
    ConnectionBudget(max_connections=125, reserved=10, processes=4).check(pool_size=20)
    with pytest.raises(BudgetExceeded):
        ConnectionBudget(max_connections=124, reserved=10, processes=4).check(pool_size=20)


def test_check_counts_max_overflow() -> None:
    budget = _design_example()
    with pytest.raises(BudgetExceeded) as info:
        budget.check(pool_size=10, max_overflow=10)
    message = str(info.value)
    assert "pool_size 10 (+ max_overflow 10) per process x 4 processes = 80 connections" in message
    assert "Set pool_size + max_overflow to at most 15" in message


def test_check_of_a_pool_bigger_than_the_whole_budget_does_not_suggest_zero_processes() -> None:
    with pytest.raises(BudgetExceeded) as info:
        _design_example().check(pool_size=100)
    message = str(info.value)
    assert "run at most" not in message
    assert "Set pool_size to at most 15, or raise max_connections to at least 582." in message


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"pool_size": 0}, "pool_size must be a whole number of connections >= 1, not 0"),
        ({"pool_size": 2.5}, "pool_size must be a whole number of connections >= 1, not 2.5"),
        (
            {"pool_size": 5, "max_overflow": -1},
            "max_overflow must be a whole number of connections >= 0, not -1",
        ),
    ],
)
def test_check_validates_its_arguments(kwargs: dict[str, object], phrase: str) -> None:
    with pytest.raises(ValueError, match="must") as info:
        _design_example().check(**kwargs)  # type: ignore[arg-type]
    assert not isinstance(info.value, BudgetExceeded)
    assert phrase in str(info.value)


def test_explain_shows_every_step_with_its_numbers() -> None:
    text = ConnectionBudget(
        max_connections=100,
        reserved=3,
        processes=4,
        other_consumers={"jobs": 5, "admin": 3},
    ).explain()
    lines = [" ".join(line.split()) for line in text.splitlines()]
    assert lines[1] == "100 max_connections the database's limit"
    assert lines[2] == "- 3 reserved kept for superusers and admin tools"
    assert lines[3] == "= 97 usable"
    assert lines[4] == "- 5 jobs another consumer of the database"
    assert lines[5] == "- 3 admin another consumer of the database"
    assert lines[6] == "= 89 left for this app"
    assert lines[7] == (
        "x 0.7 target_utilization 27 kept free as headroom for deploy overlap, "
        "migrations and admin sessions"
    )
    assert lines[8] == "= 62 app total rounded down from 62.3"
    assert lines[9] == "/ 4 processes workers x replicas, or serverless instances"
    assert lines[10] == "= 15 per process rounded down from 15.5"
    assert "Per-process cap: 15 connections." in text
    assert "concurrency limit to 15" in text
    assert "pool size (pool_size + max_overflow) to at most 15" in text


def test_explain_of_the_design_example() -> None:
    text = _design_example().explain()
    assert re.search(r"^\s+=\s+90\s+usable$", text, re.MULTILINE)
    assert re.search(r"^\s+=\s+63\s+app total$", text, re.MULTILINE)  # exact: no rounding note
    assert re.search(r"^\s+=\s+15\s+per process\s+rounded down from 15\.75$", text, re.MULTILINE)
    assert "left for this app" not in text  # no other consumers, no such step


def test_to_dict_is_json_ready() -> None:
    budget = ConnectionBudget(
        max_connections=100, reserved=10, processes=4, other_consumers={"jobs": 5}
    )
    assert json.loads(json.dumps(budget.to_dict())) == {
        "max_connections": 100,
        "reserved": 10,
        "other_consumers": {"jobs": 5},
        "target_utilization": 0.7,
        "processes": 4,
        "usable": 90,
        "app_total": 59,
        "per_process": 14,
    }


def test_serverless_multiplication_is_caught() -> None:
    # 50 instances x pool 5 = 250 connections against max_connections 100.
    budget = ConnectionBudget(max_connections=100, processes=50)
    assert (budget.app_total, budget.per_process) == (70, 1)
    with pytest.raises(BudgetExceeded) as info:
        budget.check(pool_size=5)
    message = str(info.value)
    assert "pool_size 5 (+ max_overflow 0) per process x 50 processes = 250 connections" in message
    assert "Set pool_size to at most 1, run at most 14 processes with this pool" in message
    assert budget.max_processes(5) == 14


def test_serverless_plan_says_what_pool_size_fits() -> None:
    plan = ConnectionBudget(max_connections=100).serverless(50)
    assert plan == ServerlessPlan(instances=50, pool_size=1, total=50, app_total=70, warning=None)
    plan = ConnectionBudget(max_connections=500, reserved=3).serverless(50)
    # floor(497 * 0.7) = 347; 347 // 50 = 6
    assert (plan.pool_size, plan.total, plan.app_total) == (6, 300, 347)


def test_serverless_plan_with_too_many_instances_warns_to_use_a_pooler() -> None:
    plan = ConnectionBudget(max_connections=100).serverless(200)
    assert (plan.pool_size, plan.total) == (0, 0)
    assert plan.warning is not None
    assert plan.warning.startswith("200 instances cannot each hold a connection: the budget has 70")
    assert "Cap the platform's concurrency at 70 instances" in plan.warning
    assert "PgBouncer" in plan.warning


def test_serverless_and_max_processes_validate_their_arguments() -> None:
    budget = ConnectionBudget(max_connections=100)
    with pytest.raises(ValueError, match="peak_instances must be a whole number >= 1, not 0"):
        budget.serverless(0)
    with pytest.raises(ValueError, match="pool_size must be a whole number of connections >= 1"):
        budget.max_processes(0)
    assert budget.max_processes(5, max_overflow=5) == 7
    assert budget.max_processes(71) == 0
