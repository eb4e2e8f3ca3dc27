"""The example apps, run the way their docstrings say: uvicorn in a subprocess, real PostgreSQL.

Each example reads DATABASE_URL at import; the server listens on a socket bound here on
127.0.0.1 (``uvicorn --fd``), so no port can be taken between choosing and binding it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import pytest
from pgcluster import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES: dict[str, Literal["asyncpg"] | None] = {
    # module: SQLAlchemy driver in its DATABASE_URL (None: a plain libpq URL)
    "starlette_app": "asyncpg",
    "fastapi_app": "asyncpg",
    "asyncpg_app": None,
}
STARTUP_SECONDS = 20.0

pytestmark = pytest.mark.postgres


@dataclass
class Served:
    """One example app running under uvicorn."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _start(
    module: str, database_url: str, log: Path, *, attr: str = "app", **env_vars: str
) -> Served:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": database_url, **env_vars}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                f"examples.{module}:{attr}",
                "--fd",
                str(sock.fileno()),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=[sock.fileno()],
        )
    sock.close()
    return Served(process, f"http://127.0.0.1:{port}", log)


def _wait_ready(served: Served, path: str = "/health/guardrails") -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            pytest.fail(f"{served.url} exited at startup:\n{served.output()}")
        try:
            if httpx.get(served.url + path, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{served.url} did not answer within {STARTUP_SECONDS} s:\n{served.output()}")


@pytest.fixture(scope="module")
def examples(
    postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Served]]:
    """All example apps, started at once (their imports overlap), stopped after the module."""
    logs = tmp_path_factory.mktemp("examples")
    running = {
        module: _start(module, postgres.dsn(driver), logs / f"{module}.log")
        for module, driver in EXAMPLES.items()
    }
    try:
        for served in running.values():
            _wait_ready(served)
        yield running
    finally:
        for served in running.values():
            served.process.terminate()
        for served in running.values():
            try:
                served.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                served.process.kill()
                served.process.wait()
    for module, served in running.items():
        # Requests, lifespan shutdown (guard.aclose, engine.dispose) all ended cleanly.
        assert "Traceback" not in served.output(), f"{module}:\n{served.output()}"


def _client(served: Served) -> httpx.Client:
    return httpx.Client(base_url=served.url, timeout=10)


def _health(client: httpx.Client) -> dict[str, object]:
    response = client.get("/health/guardrails")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/health+json"
    body = response.json()
    assert isinstance(body, dict)
    return body


def test_starlette_example(examples: dict[str, Served]) -> None:
    with _client(examples["starlette_app"]) as client:
        dashboard = client.get("/dashboard")
        assert dashboard.status_code == 200, dashboard.text
        tables = dashboard.json()["tables"]
        assert isinstance(tables, int)
        assert tables > 0  # pg_catalog's own tables are in pg_tables

        report = client.get("/reports/monthly")
        assert report.status_code == 200
        assert report.json() == {"report": "monthly"}

        note = client.post("/notes", content=b"hello")
        assert note.status_code == 201
        assert note.json() == {"saved": True}

        health = _health(client)
        assert health["status"] == "pass"
        checks = health["checks"]
        assert isinstance(checks, dict)
        assert checks["breaker:state"][0]["observedValue"] == "closed"
        assert checks["limiter:in_flight"][0]["observedValue"] == 0
        assert checks["limiter:in_flight"][0]["limit"] == 33  # ConnectionBudget(100, 3, 2)
        # Every connection went back to the watched pool.
        assert checks["pool:main:checked_out"][0]["observedValue"] == 0
        assert checks["pool:main:checked_out"][0]["size"] == 33

        assert client.get("/livez").json()["status"] == "pass"
        assert client.get("/readyz").status_code == 200

        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        lines = metrics.text.splitlines()
        assert "guardrails_limit 33.0" in lines
        assert "guardrails_in_flight 0.0" in lines
        assert 'guardrails_pool_checked_out{pool="main"} 0.0' in lines
        assert 'guardrails_breaker_state{state="closed"} 1.0' in lines


def test_fastapi_example(examples: dict[str, Served]) -> None:
    with _client(examples["fastapi_app"]) as client:
        item = client.get("/api/items/7")
        assert item.status_code == 200, item.text
        assert item.json() == {"id": 7}

        assert client.get("/api/items/0").status_code == 404  # the app's own answer

        checkout = client.post("/api/items/7/checkout")
        assert checkout.status_code == 200
        assert checkout.json() == {"status": "ok"}

        # FastAPI's own validation still answers through the middleware.
        assert client.get("/api/items/seven").status_code == 422

        report = client.get("/api/reports/monthly")
        assert report.status_code == 200
        assert report.json() == {"report": "monthly"}
        assert client.get("/openapi.json").json()["openapi"].startswith("3.")

        health = _health(client)
        assert health["status"] == "pass"
        checks = health["checks"]
        assert isinstance(checks, dict)
        assert checks["limiter:in_flight"][0]["limit"] == 16  # ConnectionBudget(100, 3, 4)
        assert checks["pool:main:checked_out"][0]["observedValue"] == 0

        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert "guardrails_limit 16.0" in metrics.text.splitlines()


def test_asyncpg_example(examples: dict[str, Served]) -> None:
    with _client(examples["asyncpg_app"]) as client:
        now = client.get("/now")
        assert now.status_code == 200, now.text
        assert now.json()["now"][:2] == "20"  # a timestamp from the server

        health = _health(client)
        assert health["status"] == "pass"
        checks = health["checks"]
        assert isinstance(checks, dict)
        assert checks["limiter:in_flight"][0]["limit"] == 5
        assert checks["pool:asyncpg:checked_out"][0]["observedValue"] == 0
        assert checks["pool:asyncpg:checked_out"][0]["size"] == 5


def _stop(*running: Served) -> None:
    for served in running:
        served.process.terminate()
    for served in running:
        try:
            served.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait()


def test_outbound_example(tmp_path: Path) -> None:
    """The outbound example against its flaky upstream and a partner on a closed port."""
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind(("127.0.0.1", 0))  # bound, never listening: the partner is down
    partner_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    upstream = _start("outbound_app", "", tmp_path / "upstream.log", attr="upstream")
    app: Served | None = None
    try:
        _wait_ready(upstream, "/forecast")
        app = _start(
            "outbound_app",
            "",
            tmp_path / "app.log",
            UPSTREAM_URL=upstream.url,
            PARTNER_URL=partner_url,
        )
        _wait_ready(app)
        with _client(app) as client:
            forecasts = [client.get("/forecast") for _ in range(4)]
            partner = [client.get("/partner") for _ in range(3)]
            health = _health(client)
            metrics = client.get("/metrics").text.splitlines()
    finally:
        _stop(*(served for served in (app, upstream) if served is not None))
        closed.close()
    # Every other upstream answer is a 503 (the first, a 200, went to the readiness
    # check): each call met one and retried it away.
    assert [r.status_code for r in forecasts] == [200, 200, 200, 200]
    assert all(0 < int(r.json()["deadline_ms"]) <= 3000 for r in forecasts)
    # Two refused connections open the partner's breaker; the third call is refused at once.
    assert [r.json()["error"] for r in partner] == [
        "partner_unreachable",
        "partner_unreachable",
        "partner_unavailable",
    ]
    assert partner[2].status_code == 503
    assert int(partner[2].headers["retry-after"]) >= 1
    checks = health["checks"]
    assert isinstance(checks, dict)
    assert checks[f"outbound:weather:{upstream.url}"][0]["observedValue"] == "closed"
    assert checks[f"outbound:partner:{partner_url}"][0]["observedValue"] == "open"
    assert checks["breaker:state"][0]["observedValue"] == "closed"  # the database's: untouched
    assert health["status"] == "warn"
    labels = f'client="weather",origin="{upstream.url}"'
    assert f"guardrails_outbound_calls_total{{{labels}}} 4.0" in metrics
    assert f"guardrails_outbound_retries_total{{{labels}}} 4.0" in metrics
    for served in (app, upstream):
        assert served is not None
        assert "Traceback" not in served.output()


def _serverless(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.serverless_settings", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serverless_settings_example() -> None:
    """Run as its docstring says; the numbers are ConnectionBudget's serverless plan."""
    run = _serverless("--max-connections", "100", "--peak-instances", "40")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    # floor((100 - 3) x 0.7) = 67 connections among 40 instances: a pool of 1 each.
    assert lines[0] == "40 instances share 67 connections: pool_size 1 each, 40 at peak"
    assert "'pool_size': 1" in lines[1]
    assert "'pool_timeout': 2" in lines[1]
    assert lines[2] == "guard:  {'concurrency': 1, 'queue_timeout': 0.25, 'max_queue': 8}"
    # Too many instances for the budget: the example says so and exits 1.
    many = _serverless("--max-connections", "20", "--peak-instances", "50")
    assert many.returncode == 1
    assert "warning: 50 instances cannot each hold a connection" in many.stdout
