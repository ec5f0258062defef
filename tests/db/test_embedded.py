"""Real-process tests of the embedded PostgreSQL server manager (autodispatch.db.embedded)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

import autodispatch.db.embedded as embedded
from autodispatch.db.embedded import EmbeddedPostgres, EmbeddedPostgresError, running_url

pytestmark = pytest.mark.slow

INITDB_NOTE = "running initdb for"

# A process using the server: starts (at a given wall-clock time), prints the URL, then on a
# line "stop" on stdin calls stop() and prints "stopped"; on EOF it just exits.
CHILD = """
import sys, time
from pathlib import Path
from autodispatch.db.embedded import EmbeddedPostgres

home, start_at = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))
pg = EmbeddedPostgres(home, fast=True)
print(pg.start(), flush=True)
if sys.stdin.readline().strip() == "stop":
    pg.stop()
    print("stopped", flush=True)
"""

Spawn = Callable[..., subprocess.Popen[str]]


# --------------------------------------------------------------------------------------------
# helpers


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _postmaster_pid(home: Path) -> int:
    return int((home / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0])


def _server_processes(home: Path) -> list[psutil.Process]:
    """All live postgres processes (postmaster and children) working in home/pgdata."""
    pgdata = os.path.realpath(home / "pgdata")
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if (
                proc.info["name"] == "postgres"
                and proc.status() != psutil.STATUS_ZOMBIE
                and os.path.realpath(proc.cwd()) == pgdata
            ):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _postmasters(home: Path) -> list[int]:
    procs = _server_processes(home)
    pids = {p.pid for p in procs}
    return [p.pid for p in procs if p.ppid() not in pids]


def _kill_servers(home: Path) -> None:
    """Test cleanup: immediate shutdown of any server on home, then SIGKILL what is left."""
    for pid in _postmasters(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown
    if not _wait_until(lambda: not _server_processes(home), timeout=10):
        for proc in _server_processes(home):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _wait_until(lambda: not _server_processes(home), timeout=10)


def _initdb_runs(home: Path) -> int:
    return (home / "postgres.log").read_text(errors="replace").count(INITDB_NOTE)


def _claims(home: Path) -> list[int]:
    path = home / "claims.json"
    return [c["pid"] for c in json.loads(path.read_text())] if path.exists() else []


def _query(url: str, sql: str) -> object:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]


def _execute(url: str, *statements: str) -> None:
    with psycopg.connect(url, connect_timeout=5) as conn:
        conn.execute("set synchronous_commit to on")  # survive a SIGKILLed postmaster
        for sql in statements:
            conn.execute(sql)


def _read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"child {proc.pid} exited with {proc.returncode} without output:\n{err}")
    return line


def _child_env() -> dict[str, str]:
    src = str(Path(embedded.__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def base_dir(tmp_path: Path) -> Iterator[Path]:
    """Where test homes go: tmp_path, or as root a directory of our own under temp.

    As root the server runs as another user, who must be able to traverse the path to home
    (start() opens it up). But every pytest session that starts resets /tmp/pytest-of-root to
    mode 0700, which breaks an initdb or start running meanwhile in a concurrent session.
    """
    if os.geteuid() != 0:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="autodispatch-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home(base_dir: Path) -> Iterator[Path]:
    """A fresh home; whatever servers are left on it are shut down at the end."""
    path = base_dir / "home"
    try:
        yield path
    finally:
        _kill_servers(path)


@pytest.fixture
def spawn(home: Path) -> Iterator[Spawn]:
    """Start CHILD processes on home; they are killed at the end if still running."""
    procs: list[subprocess.Popen[str]] = []

    def _spawn(start_at: float | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(home), str(start_at or 0.0)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_child_env(),
        )
        procs.append(proc)
        return proc

    try:
        yield _spawn
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)


def _stop_child(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("stop\n")
    proc.stdin.flush()
    assert _read_line(proc) == "stopped"
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


# --------------------------------------------------------------------------------------------
# tests


def test_start_fresh_home_serves_queries_and_stop_ends_postmaster(home: Path) -> None:
    """A first start initialises the data dir and serves queries; stop ends the postmaster."""
    pg = EmbeddedPostgres(home, fast=True)
    try:
        url = pg.start()
        socket_dir = home / "run"
        assert url == f"postgresql://postgres@/postgres?host={socket_dir}&port=5432"
        assert pg.start() == url  # idempotent: no second claim
        assert _claims(home) == [os.getpid()]
        assert (pg.pgdata / "PG_VERSION").is_file()
        assert _query(url, "select 1") == 1
        assert _query(url, "show max_connections") == "200"
        assert _query(url, "show listen_addresses") == ""
        assert _query(url, "show fsync") == "off"
        assert pg.url("template1").startswith("postgresql://postgres@/template1?host=")
        assert _query(pg.url("template1"), "select current_database()") == "template1"
        psql = shutil.which("psql") or str(Path(embedded._bin("psql")))
        out = subprocess.run(
            [psql, url, "-Atc", "select current_user"], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "postgres"
        postmaster = _postmaster_pid(home)
        assert _alive(postmaster)
    finally:
        pg.stop()
    assert not _alive(postmaster)
    assert not (pg.pgdata / "postmaster.pid").exists()
    assert _claims(home) == []
    with pytest.raises(EmbeddedPostgresError, match="not started"):
        pg.url()


def test_restart_reuses_data_without_initdb(home: Path) -> None:
    """A second start on the same home reuses the cluster and its data; initdb runs only once."""
    with EmbeddedPostgres(home, fast=True) as pg:
        url = pg.url()
        _execute(url, "create table kept (v int)", "insert into kept values (42)")
        system_id = _query(url, "select system_identifier from pg_control_system()")
    with EmbeddedPostgres(home, fast=True) as pg:
        url = pg.url()
        assert _query(url, "select v from kept") == 42
        assert _query(url, "select system_identifier from pg_control_system()") == system_id
    assert _initdb_runs(home) == 1
    assert _postmasters(home) == []


def test_second_process_joins_and_last_one_stops(home: Path, spawn: Spawn) -> None:
    """A second process joins the running server; the server stops only when the last user stops."""
    pg = EmbeddedPostgres(home, fast=True)
    try:
        url = pg.start()
        postmaster = _postmaster_pid(home)
        started_at = _query(url, "select pg_postmaster_start_time()")
        child = spawn()
        assert _read_line(child) == url
        assert _postmaster_pid(home) == postmaster
        assert _postmasters(home) == [postmaster]
        assert _query(url, "select pg_postmaster_start_time()") == started_at
        assert sorted(_claims(home)) == sorted([os.getpid(), child.pid])
        _stop_child(child)
        assert _alive(postmaster)
        assert _query(url, "select 1") == 1
        assert running_url(home) == url
        assert _claims(home) == [os.getpid()]
    finally:
        pg.stop()
    assert not _alive(postmaster)
    assert _initdb_runs(home) == 1


def test_owner_sigkilled_next_start_joins_and_prunes_dead_claim(home: Path, spawn: Spawn) -> None:
    """After its owner is SIGKILLed, a new start joins the server and the last stop ends it."""
    child = spawn()
    url = _read_line(child)
    postmaster = _postmaster_pid(home)
    _execute(url, "create table kept (v int)", "insert into kept values (7)")
    child.kill()  # SIGKILL; not reaped yet, so it lingers as a zombie with its pid
    assert _wait_until(lambda: not _alive(child.pid))
    assert _alive(postmaster)  # pg_ctl detached the postmaster from its owner

    pg = EmbeddedPostgres(home, fast=True)
    try:
        assert pg.start() == url
        assert _postmaster_pid(home) == postmaster
        assert _claims(home) == [os.getpid()]  # the dead child's claim was pruned
        assert _query(url, "select v from kept") == 7
    finally:
        pg.stop()
    assert not _alive(postmaster)
    assert _server_processes(home) == []


def test_postmaster_sigkilled_too_next_start_comes_up_cleanly(home: Path, spawn: Spawn) -> None:
    """After both the owner and the postmaster are SIGKILLed, the next start recovers the data."""
    child = spawn()
    url = _read_line(child)
    postmaster = _postmaster_pid(home)
    _execute(url, "create table kept (v int)", "insert into kept values (9)")
    child.kill()
    os.kill(postmaster, signal.SIGKILL)
    assert _wait_until(lambda: not _alive(child.pid) and not _alive(postmaster))
    assert (home / "pgdata" / "postmaster.pid").exists()  # stale

    pg = EmbeddedPostgres(home, fast=True)
    try:
        assert pg.start() == url
        new_postmaster = _postmaster_pid(home)
        assert new_postmaster != postmaster
        assert _postmasters(home) == [new_postmaster]
        assert _query(url, "select v from kept") == 9
        assert _claims(home) == [os.getpid()]
    finally:
        pg.stop()
    assert not _alive(new_postmaster)
    assert _server_processes(home) == []


def test_postmaster_pid_of_unrelated_live_process_is_not_trusted(home: Path) -> None:
    """A postmaster.pid naming a live process that is not our postgres is ignored, not joined."""
    with EmbeddedPostgres(home, fast=True):
        pass
    with subprocess.Popen(["sleep", "60"]) as impostor:
        try:
            (home / "pgdata" / "postmaster.pid").write_text(f"{impostor.pid}\n{home}/pgdata\n")
            assert running_url(home) is None
            pg = EmbeddedPostgres(home, fast=True)
            try:
                url = pg.start()
                assert _postmaster_pid(home) != impostor.pid
                assert _query(url, "select 1") == 1
            finally:
                pg.stop()
            assert impostor.poll() is None  # left alone
        finally:
            impostor.kill()
    assert _postmasters(home) == []


def test_concurrent_first_start_runs_one_initdb_and_one_postmaster(
    home: Path, spawn: Spawn
) -> None:
    """Two processes starting on an empty home at once both succeed with one initdb and server."""
    start_at = time.time() + 1.5  # both children are imported and waiting by then
    first, second = spawn(start_at), spawn(start_at)
    url = _read_line(first)
    assert _read_line(second) == url
    assert _initdb_runs(home) == 1
    postmasters = _postmasters(home)
    assert postmasters == [_postmaster_pid(home)]
    assert sorted(_claims(home)) == sorted([first.pid, second.pid])
    assert _query(url, "select 1") == 1

    _stop_child(first)
    assert _alive(postmasters[0])
    _stop_child(second)
    assert not _alive(postmasters[0])
    assert _claims(home) == []


def test_process_exiting_without_stop_releases_its_claim(home: Path, spawn: Spawn) -> None:
    """A process that exits normally without calling stop() still stops its server at exit."""
    child = spawn()
    _read_line(child)
    postmaster = _postmaster_pid(home)
    _, err = child.communicate(input="", timeout=60)  # EOF: the child returns without stop()
    assert child.returncode == 0, err
    assert not _alive(postmaster)
    assert _claims(home) == []


def test_failed_start_raises_with_log_tail(home: Path) -> None:
    """A server that cannot start raises EmbeddedPostgresError naming the log and quoting it."""
    with EmbeddedPostgres(home, fast=True):
        pass
    with (home / "pgdata" / "postgresql.conf").open("a") as conf:
        conf.write("shared_buffers = banana\n")
    pg = EmbeddedPostgres(home, fast=True)
    with pytest.raises(EmbeddedPostgresError) as raised:
        pg.start()
    message = str(raised.value)
    assert "PostgreSQL did not start" in message
    assert f"Server log: {home / 'postgres.log'}" in message
    assert 'invalid value for parameter "shared_buffers"' in message
    assert _claims(home) == []
    assert _postmasters(home) == []
    pg.stop()  # not started: nothing to do, no error


def test_running_url_reports_the_server_only_while_it_runs(home: Path) -> None:
    """running_url is None without a server and the start() URL while one runs."""
    assert running_url(home) is None
    assert not home.exists()  # asking does not create anything
    pg = EmbeddedPostgres(home, fast=True)
    try:
        url = pg.start()
        assert running_url(home) == url
    finally:
        pg.stop()
    assert running_url(home) is None


def test_long_home_puts_socket_in_short_temp_dir(base_dir: Path) -> None:
    """A home too long for a Unix socket path gets its socket in a short dir under temp."""
    home = base_dir / ("h" * 90) / "home"
    assert len(str(home / "run" / ".s.PGSQL.5432")) > 107
    pg = EmbeddedPostgres(home, fast=True)
    try:
        url = pg.start()
        host = url.split("host=", 1)[1].split("&", 1)[0]
        assert Path(host).parent == Path(tempfile.gettempdir())
        assert not (home / "run").exists()
        assert _query(url, "select 1") == 1
        assert running_url(home) == url
    finally:
        pg.stop()
        _kill_servers(home)
    assert not Path(host).exists()  # stop removes the temp socket dir
