"""Throwaway PostgreSQL clusters for the test suite: find the binaries, initdb, start, stop.

Kept apart from ``conftest.py`` so the fixtures there stay short and this can be read (and
reused) on its own. Nothing here starts a server by itself: ``conftest.py`` decides when.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

import pytest

Driver = Literal["asyncpg", "psycopg"] | None
StopMode = Literal["smart", "fast", "immediate"]
SettingValue = str | int | float | bool

MISSING_BINARIES = (
    "PostgreSQL binaries (initdb, pg_ctl) not found; install postgresql or set DATABASE_URL"
)
EXTERNAL_SERVER = (
    "the server comes from DATABASE_URL, so the suite cannot stop or start it; "
    "unset DATABASE_URL to run this test on the suite's own cluster"
)

# Speed over durability: the data is thrown away at the end of the session anyway.
# shared_buffers is kept small because several clusters may run at once.
DEFAULT_SETTINGS: dict[str, SettingValue] = {
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
    "shared_buffers": "32MB",
}

_LOG_TAIL_LINES = 30
_TIMEOUT_SECONDS = 60


def find_bindir() -> Path | None:
    """Directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None when there is none.

    PATH wins; otherwise Debian/Ubuntu keep the binaries off PATH in
    ``/usr/lib/postgresql/<major>/bin``, where the newest major is taken.
    """
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl") and shutil.which("postgres"):
        return Path(initdb).resolve().parent

    def major(bindir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)

    candidates = [
        bindir
        for bindir in Path("/usr/lib/postgresql").glob("*/bin")
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))
    ]
    return max(candidates, key=major, default=None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (racy by nature: see ``PgCluster.start``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_value(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def _world_traversable(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def _server_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGHOST... from the developer's shell must not redirect pg_ctl to
    # some other cluster.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


class PgCluster:
    """One throwaway cluster: a temp dir with the data dir, the socket and the server log.

    The server refuses to run as root, so as root every initdb/pg_ctl call goes through
    ``runuser -u postgres`` and the temp dir is handed to that user.
    """

    def __init__(
        self,
        bindir: Path,
        *,
        max_connections: int = 100,
        settings: dict[str, SettingValue] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.bindir = bindir
        self.host = host
        self.port = 0
        self.max_connections = max_connections
        self.settings: dict[str, SettingValue] = {
            **DEFAULT_SETTINGS,
            "max_connections": max_connections,
            **(settings or {}),
        }
        self._as_postgres: list[str] = []
        self._owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root, but there is no 'postgres' user to run the server as "
                    "(PostgreSQL refuses to run as root)"
                ) from None
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
        self.root = Path(tempfile.mkdtemp(prefix="guardrails-pg-", dir=self._temp_parent()))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.running = False
        self._destroyed = False
        if self._owner is not None:
            os.chown(self.root, self._owner.pw_uid, self._owner.pw_gid)
        _live_clusters.append(self)

    def _temp_parent(self) -> str | None:
        # As root, tempfile may pick a dir under /root that the postgres user cannot enter.
        if self._owner is not None and not _world_traversable(Path(tempfile.gettempdir())):
            return "/tmp"
        return None

    @property
    def version(self) -> tuple[int, int]:
        """(major, minor) of the binaries, e.g. (15, 8)."""
        out = self._run(["postgres", "--version"]).stdout
        found = re.search(r"(\d+)(?:\.(\d+))?", out)
        if found is None:
            raise RuntimeError(f"cannot read a version from {out!r}")
        return int(found.group(1)), int(found.group(2) or 0)

    def _run(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [*self._as_postgres, str(self.bindir / argv[0]), *argv[1:]]
        result = subprocess.run(
            command,
            cwd=self.root,  # the postgres user may not be allowed into the caller's cwd
            env=_server_env(),
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_SECONDS,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited with {result.returncode}\n"
                f"{result.stdout}{result.stderr}{self.log_tail()}"
            )
        return result

    def log_tail(self) -> str:
        """The last lines of the server log, for error messages."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        tail = "\n".join(lines[-_LOG_TAIL_LINES:])
        return f"--- last lines of {self.log_path} ---\n{tail}\n"

    def init(self) -> None:
        """initdb with trust auth (local and loopback) and the settings, then start."""
        self._run(
            [
                "initdb",
                "--pgdata",
                str(self.data_dir),
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",  # the machine may lack the caller's locale
                "--no-sync",
            ]
        )
        self._start_on_a_free_port()

    def _write_settings(self) -> None:
        # postgresql.auto.conf is read last, so these win over postgresql.conf; rewriting it
        # whole (rather than ALTER SYSTEM) also works while the server is down.
        settings: dict[str, SettingValue] = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": str(self.root),
            **self.settings,
        }
        auto_conf = self.data_dir / "postgresql.auto.conf"
        auto_conf.write_text(
            "".join(f"{name} = {_conf_value(value)}\n" for name, value in settings.items())
        )

    def _start_on_a_free_port(self, attempts: int = 3) -> None:
        # free_port() only says the port was free a moment ago; another process can take it
        # before the server binds, so try a fresh port when that is what went wrong.
        for attempt in range(attempts):
            self.port = free_port(self.host)
            self._write_settings()
            try:
                self.start()
            except RuntimeError:
                if attempt + 1 < attempts and "could not bind" in self.log_tail():
                    continue
                raise
            return

    def start(self) -> None:
        """Start the server on its port and return once it accepts connections."""
        self._run(
            [
                "pg_ctl",
                "start",
                "--wait",
                f"--timeout={_TIMEOUT_SECONDS}",
                "--pgdata",
                str(self.data_dir),
                "--log",
                str(self.log_path),
            ]
        )
        self.running = True

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server; ``immediate`` is a crash (recovery runs at the next start)."""
        self._run(
            [
                "pg_ctl",
                "stop",
                "--wait",
                f"--timeout={_TIMEOUT_SECONDS}",
                "--pgdata",
                str(self.data_dir),
                f"--mode={mode}",
            ]
        )
        self.running = False

    def destroy(self) -> None:
        """Stop the server at once, whatever its state, and delete everything on disk."""
        if self._destroyed:
            return
        self._destroyed = True
        with contextlib.suppress(ValueError):
            _live_clusters.remove(self)
        if (self.data_dir / "postmaster.pid").exists():
            # check=False: the server may have died already; pg_ctl then just says so.
            self._run(
                ["pg_ctl", "stop", "--wait", "--pgdata", str(self.data_dir), "--mode=immediate"],
                check=False,
            )
        self.running = False
        shutil.rmtree(self.root, ignore_errors=True)


# Every cluster not yet destroyed: fixtures' finalizers normally empty this, the atexit hook
# is the backstop for sessions that end without running them (e.g. an error in a hook).
_live_clusters: list[PgCluster] = []


def live_clusters() -> list[PgCluster]:
    """Clusters started in this process and not destroyed yet."""
    return list(_live_clusters)


@atexit.register
def _destroy_leftovers() -> None:
    for cluster in list(_live_clusters):
        with contextlib.suppress(Exception):
            cluster.destroy()


@dataclass
class PostgresServer:
    """Where a running PostgreSQL is, and (for the suite's own clusters) a way to stop it.

    ``cluster`` is None for a server given by DATABASE_URL: ``stop()`` and ``start()``
    then skip the calling test, because the suite must not touch someone else's server.
    """

    host: str
    port: int
    user: str = "postgres"
    dbname: str = "postgres"
    password: str | None = field(default=None, repr=False)
    cluster: PgCluster | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_url(cls, url: str) -> PostgresServer:
        """Parse ``postgresql://user:pass@host:port/db`` (a ``+driver`` suffix is ignored)."""
        parts = urlsplit(url)
        if not parts.scheme.startswith(("postgresql", "postgres")):
            raise ValueError(f"not a postgresql:// URL: {parts.scheme}://...")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=unquote(parts.username) if parts.username else "postgres",
            password=unquote(parts.password) if parts.password else None,
            dbname=unquote(parts.path.lstrip("/")) or "postgres",
        )

    @property
    def managed(self) -> bool:
        """True when the suite started this server and so may stop and start it."""
        return self.cluster is not None

    def dsn(self, driver: Driver = None) -> str:
        """SQLAlchemy URL for ``driver``, or the plain libpq URL when ``driver`` is None."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        userinfo = quote(self.user, safe="")
        if self.password is not None:
            userinfo += ":" + quote(self.password, safe="")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{userinfo}@{host}:{self.port}/{quote(self.dbname, safe='')}"

    def _control(self) -> PgCluster:
        if self.cluster is None:
            pytest.skip(EXTERNAL_SERVER)
        return self.cluster

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (clients then get connection refused) until ``start()``."""
        self._control().stop(mode)

    def start(self) -> None:
        """Start it again on the same port; returns once it accepts connections."""
        self._control().start()

    @property
    def running(self) -> bool:
        """Whether the suite's cluster is up (always True for a DATABASE_URL server)."""
        return self.cluster is None or self.cluster.running

    def close(self) -> None:
        """Stop and delete a suite cluster now rather than at the end of the session."""
        if self.cluster is not None:
            self.cluster.destroy()


def start_cluster(
    bindir: Path, *, max_connections: int = 100, **settings: SettingValue
) -> PostgresServer:
    """initdb and start a new cluster; delete it again if it cannot be started."""
    cluster = PgCluster(bindir, max_connections=max_connections, settings=settings)
    try:
        cluster.init()
    except BaseException:
        cluster.destroy()
        raise
    return PostgresServer(host=cluster.host, port=cluster.port, cluster=cluster)
