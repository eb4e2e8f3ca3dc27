"""The documentation against the code: the configuration reference, snippets, the first app.

``docs/configuration.md`` lists every setting with its default in one table per
settings object; these tests read those tables and compare them with the signatures
and dataclass fields, both ways. Python snippets in the docs must at least compile, and
the getting-started app must behave as that page says.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import guardrails as gr
import guardrails.prometheus
import guardrails.testing

DOCS = Path(__file__).resolve().parent.parent / "docs"
REQUIRED = "required"

# The settings objects the reference documents, by the name in each section's heading.
DOCUMENTED: dict[str, Callable[..., Any]] = {
    "Guardrails": gr.Guardrails,
    "ConnectionBudget": gr.ConnectionBudget,
    "BreakerSettings": gr.BreakerSettings,
    "RetrySettings": gr.RetrySettings,
    "Policy": gr.Policy,
    "MemoryCache": gr.MemoryCache,
    "RedisCache": gr.RedisCache,
    "RedisCoordinator": gr.RedisCoordinator,
    "EarlyWarning": gr.EarlyWarning,
    "ConcurrencyLimiter": gr.ConcurrencyLimiter,
    "AdaptiveLimit": gr.AdaptiveLimit,
    "GuardedTransport": gr.GuardedTransport,
    "DatabaseFault": guardrails.testing.DatabaseFault,
    "FaultTransport": guardrails.testing.FaultTransport,
    "ChaosRule": guardrails.testing.ChaosRule,
    "ChaosMiddleware": guardrails.testing.ChaosMiddleware,
}

_NO_DEFAULT = object()
_SAFE_NODES = (
    ast.Expression,
    ast.Constant,
    ast.Tuple,
    ast.List,
    ast.Dict,
    ast.BinOp,
    ast.Mult,
    ast.Pow,
    ast.UnaryOp,
    ast.USub,
    ast.Name,
    ast.Attribute,
    ast.Load,
)


def code_defaults(target: Callable[..., Any]) -> dict[str, Any]:
    """Every setting of ``target`` with its default (``_NO_DEFAULT`` when required)."""
    if dataclasses.is_dataclass(target):
        found: dict[str, Any] = {}
        for spec in dataclasses.fields(target):
            if spec.default is not dataclasses.MISSING:
                found[spec.name] = spec.default
            elif spec.default_factory is not dataclasses.MISSING:
                found[spec.name] = spec.default_factory()
            else:
                found[spec.name] = _NO_DEFAULT
        return found
    signature = inspect.signature(target.__init__)
    return {
        name: _NO_DEFAULT if param.default is inspect.Parameter.empty else param.default
        for name, param in signature.parameters.items()
        if name != "self"
    }


def doc_value(cell: str) -> Any:
    """The default a table cell shows: a Python literal, small arithmetic or a dotted name."""
    if cell == REQUIRED:
        return _NO_DEFAULT
    match = re.fullmatch(r"`([^`]+)`", cell)
    assert match, f"a default is written in backticks, or as {REQUIRED!r}: {cell!r}"
    tree = ast.parse(match.group(1), mode="eval")
    for node in ast.walk(tree):
        assert isinstance(node, _SAFE_NODES), f"not a plain default: {cell!r}"
    return eval(compile(tree, "<docs>", "eval"), {"__builtins__": {}}, {"time": time})


def reference_tables(text: str) -> dict[str, dict[str, str]]:
    """``{section name: {setting: default cell}}`` from the configuration page."""
    tables: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        heading = re.fullmatch(r"## `(\w+)`", line.strip())
        if heading:
            current = tables.setdefault(heading.group(1), {})
            continue
        if line.startswith("## "):
            current = None
            continue
        row = re.fullmatch(r"\| `(\w+)` \| ([^|]+?) \|.*\|", line.strip())
        if current is not None and row:
            name, default = row.groups()
            assert name not in current, f"{name} is listed twice"
            current[name] = default.strip()
    return tables


REFERENCE = reference_tables((DOCS / "configuration.md").read_text())


def test_every_settings_object_has_a_section() -> None:
    assert set(REFERENCE) == set(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_reference_matches_the_code(name: str) -> None:
    documented = REFERENCE[name]
    actual = code_defaults(DOCUMENTED[name])
    missing = sorted(set(actual) - set(documented))
    unknown = sorted(set(documented) - set(actual))
    assert not missing, f"{name}: settings missing from docs/configuration.md: {missing}"
    assert not unknown, f"{name}: documented settings the code does not have: {unknown}"
    for setting, default in actual.items():
        shown = doc_value(documented[setting])
        if default is _NO_DEFAULT or shown is _NO_DEFAULT:
            assert shown is default, f"{name}.{setting}: required in one, not in the other"
        else:
            assert shown == default, f"{name}.{setting}: docs say {shown!r}, code has {default!r}"
            assert type(shown) is type(default) or isinstance(default, str), (
                f"{name}.{setting}: docs show a {type(shown).__name__}, "
                f"code has a {type(default).__name__} ({default!r})"
            )


def test_reference_reader_sees_a_wrong_default() -> None:
    # The checks above would pass vacuously if the reader found no rows.
    text = "## `RetrySettings`\n\n| setting | default | meaning |\n| `attempts` | `4` | x |\n"
    tables = reference_tables(text)
    assert tables == {"RetrySettings": {"attempts": "`4`"}}
    assert (
        doc_value(tables["RetrySettings"]["attempts"])
        != code_defaults(gr.RetrySettings)["attempts"]
    )
    with pytest.raises(AssertionError, match="not a plain default"):
        doc_value("`__import__('os')`")


def test_api_reference_renders_every_public_name() -> None:
    page = (DOCS / "reference" / "api.md").read_text()
    rendered = re.findall(r"^::: guardrails\.([\w.]+)$", page, re.MULTILINE)
    assert len(rendered) == len(set(rendered)), "a name is rendered twice"
    assert {name for name in rendered if "." not in name} == set(gr.__all__)
    assert {name for name in rendered if "." in name} == {
        f"prometheus.{name}" for name in guardrails.prometheus.__all__
    } | {f"testing.{name}" for name in guardrails.testing.__all__}


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """The ```python blocks of a page, with the line each starts on."""
    blocks: list[tuple[int, str]] = []
    lines = page.read_text().splitlines()
    start: int | None = None
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if start is None and stripped == "```python":
            start = number
        elif start is not None and stripped == "```":
            # Blocks inside list items are indented like the item.
            blocks.append((start, textwrap.dedent("\n".join(lines[start : number - 1]))))
            start = None
    return blocks


PAGES = sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_python_snippets_compile(page: Path) -> None:
    for line, source in python_blocks(page):
        try:
            # Top-level await is fine in a snippet (it runs inside an async function).
            compile(source, f"{page.name}:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        except SyntaxError as exc:
            pytest.fail(f"{page.name}, block at line {line}: {exc}")


def run_block(page: str, index: int) -> dict[str, Any]:
    """Run one python block of a page as a module; return its globals."""
    blocks = python_blocks(DOCS / page)
    assert len(blocks) > index, f"{page} has no python block number {index + 1}"
    line, source = blocks[index]
    namespace: dict[str, Any] = {"__name__": page.removesuffix(".md").replace("-", "_")}
    exec(compile(source, f"{page}:{line}", "exec"), namespace)
    return namespace


@pytest.mark.anyio
async def test_getting_started_app_sheds_as_the_page_shows() -> None:
    namespace = run_block("getting-started.md", 0)
    app, guard = namespace["app"], namespace["guard"]
    limiter = guard.limiter
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        results: list[httpx.Response] = []

        async def slow() -> None:
            results.append(await client.get("/slow"))

        async with anyio.create_task_group() as tg:
            for _ in range(limiter.limit + limiter.max_queue):
                tg.start_soon(slow)
            with anyio.fail_after(5):
                while limiter.in_flight < limiter.limit or limiter.queued < limiter.max_queue:
                    await anyio.sleep(0.01)
            # Every slot busy, the queue full: the next request is shed at once...
            shed = await client.get("/slow")
            # ... while the route that needs no database still answers.
            hello = await client.get("/")
            health = await client.get("/health/guardrails")
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1"
        assert shed.json() == {"error": "overloaded", "retry_after": 1}
        assert hello.json() == {"hello": "world"}
        assert health.status_code == 200
        assert health.headers["content-type"] == "application/health+json"
        checks = health.json()["checks"]
        assert checks["limiter:in_flight"][0]["observedValue"] == 2
        assert checks["limiter:queued"][0]["observedValue"] == 2
        # The two that queued gave up after queue_timeout; the two with slots finished.
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200, 200, 503, 503]
        assert {r.json()["error"] for r in results if r.status_code == 503} == {"overloaded"}
        snapshot = guard.snapshot()["limiter"]
        assert snapshot["in_flight"] == 0
        assert snapshot["shed_by_reason"] == {"queue_full": 1, "queue_timeout": 2}


@pytest.mark.anyio
async def test_getting_started_fastapi_app() -> None:
    namespace = run_block("getting-started.md", 1)
    transport = httpx.ASGITransport(app=namespace["app"])
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        assert (await client.get("/")).json() == {"hello": "world"}
        health = await client.get("/health/guardrails")
        assert health.status_code == 200
        assert health.json()["checks"]["limiter:in_flight"][0]["limit"] == 2
    guard = namespace["guard"]
    assert guard.snapshot()["limiter"]["admitted_total"] == 0  # "/" took no slot


def recipe(marker: str, **names: Any) -> dict[str, Any]:
    """Run the recipes.md block containing ``marker`` (``routes=[...]`` left empty)."""
    found = [source for _, source in python_blocks(DOCS / "recipes.md") if marker in source]
    assert len(found) == 1, f"expected one recipe block with {marker!r}, found {len(found)}"
    namespace: dict[str, Any] = {"__name__": "recipe", **names}
    exec(compile(found[0].replace("routes=[...]", "routes=[]"), "recipes.md", "exec"), namespace)
    return namespace


@pytest.mark.anyio
async def test_fastapi_recipe() -> None:
    namespace = recipe("APIRouter")
    transport = httpx.ASGITransport(app=namespace["app"])
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        assert (await client.get("/health/guardrails")).status_code == 200
        metrics = await client.get("/metrics")
        assert "guardrails_limit 16.0" in metrics.text.splitlines()
        assert (await client.get("/openapi.json")).status_code == 200
    # Health, metrics and FastAPI's pages took no slot.
    assert namespace["guard"].snapshot()["limiter"]["admitted_total"] == 0


async def one_order(postgres: Any) -> None:
    """The recipes' ``orders`` table, holding one order of customer 1 (total 5)."""
    import asyncpg

    conn = await asyncpg.connect(postgres.dsn())
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS orders (customer_id int, total int, state text)"
        )
        await conn.execute("DELETE FROM orders WHERE customer_id = 1")
        await conn.execute("INSERT INTO orders VALUES (1, 5, 'open')")
    finally:
        await conn.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("marker", "driver", "call"),
    [
        ("Session = async_sessionmaker(", "asyncpg", "order_count"),
        ("asyncpg.create_pool(", None, "server_time"),
        ("AsyncConnectionPool(", None, "open_orders"),
    ],
)
async def test_database_recipes_run_on_postgres(
    postgres: Any, marker: str, driver: Any, call: str
) -> None:
    await one_order(postgres)
    namespace = recipe(marker, DATABASE_URL=postgres.dsn(driver))
    app, guard = namespace["app"], namespace["guard"]
    async with app.router.lifespan_context(app):
        args = (1,) if call == "order_count" else ()
        result = await namespace[call](*args)
        assert result is not None
        if call != "server_time":
            assert result >= 1
        (pool,) = guard.snapshot()["pools"]
        assert pool["acquires_total"] >= 1
        assert pool["checked_out"] == 0


def test_pgbouncer_classifier_recipe() -> None:
    namespace = recipe("PGBOUNCER_OUTAGES", gr=gr, budget=gr.ConnectionBudget(max_connections=40))
    settings = namespace["guard"].breaker.settings
    refused = RuntimeError("no more connections allowed (max_client_conn)")
    assert gr.classify(refused, settings.classifiers) is gr.ErrorKind.OUTAGE
    assert gr.classify(ValueError("bad input"), settings.classifiers) is gr.ErrorKind.APP


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("marker", "driver"), [("AsyncSessionDep", "asyncpg"), ("SyncSessionDep", "psycopg")]
)
async def test_fastapi_depends_recipes_run_on_postgres(
    postgres: Any, marker: str, driver: str
) -> None:
    await one_order(postgres)
    namespace = recipe(marker, DATABASE_URL=postgres.dsn(driver))  # type: ignore[arg-type]
    app, guard = namespace["app"], namespace["guard"]
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        assert guard.background.started  # the lifespan runs the sampler and the probe
        assert (await client.get("/customers/1/orders")).json() == {"orders": 1}
        if marker == "AsyncSessionDep":
            assert (await client.get("/customers/1/total")).json() == {"total": 5}
        assert (await client.get("/customers/x/orders")).status_code == 422
    (pool,) = guard.snapshot()["pools"]
    assert pool["acquires_total"] >= 1
    # Each session gave its connection back within its request.
    assert (pool["checked_out"], pool["leak_suspects_total"]) == (0, 0)
    assert guard.limiter.in_flight == 0
    assert guard.breaker.settings.probe is not None


@pytest.mark.anyio
async def test_verified_identity_cache_key_recipe() -> None:
    verified: list[str] = []

    def verify_token(token: str) -> dict[str, str] | None:
        verified.append(token)
        return {"sub": token.removeprefix("good-")} if token.startswith("good-") else None

    namespace = recipe("verified_subject", verify_token=verify_token)
    app, guard = namespace["app"], namespace["guard"]
    transport = httpx.ASGITransport(app=app)
    alice = {"authorization": "Bearer good-alice"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        first = await client.get("/me/orders", headers=alice)
        assert verified == ["good-alice"]  # once: the dependency reused the middleware's
        assert (await client.get("/me/orders")).status_code == 401
        assert (
            await client.get("/me/orders", headers={"authorization": "Bearer x"})
        ).status_code == 401
        guard.breaker.force_open(30)  # the database is down: alice gets her own copy
        stale = await client.get("/me/orders", headers=alice)
        bob = await client.get("/me/orders", headers={"authorization": "Bearer good-bob"})
    assert first.json() == {"orders_of": "alice"}
    assert (stale.status_code, stale.headers["x-guardrails"]) == (200, "stale")
    assert stale.json() == {"orders_of": "alice"}
    assert bob.status_code == 503  # never alice's page
