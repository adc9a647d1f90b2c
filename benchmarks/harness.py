"""What the workloads stand on: the database server, the processes the runner starts, the
sides (this checkout, optionally this checkout again with psycopg 3, and django-pgpubsub 1.3.1)
and the engine that processes notifications."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().parent / "project_template"
THEIRS_REQUIREMENTS = [
    "django-pgpubsub==1.3.1",
    "django>=4.2,<5",
    "django-pgtrigger",
    "psycopg2-binary",
]
#: What the venv of this checkout with psycopg 3 installs besides the checkout itself (editable,
#: with its ``psycopg`` extra): gunicorn for the embedded workloads, and no psycopg2.
PSYCOPG3_REQUIREMENTS = ["gunicorn"]

#: The sides' names: this checkout with the runner's Python, the same checkout in a venv with
#: psycopg 3 (``--psycopg3``), django-pgpubsub 1.3.1.
OURS = "ours"
OURS_PSYCOPG3 = "ours-psycopg3"
THEIRS = "theirs"

#: Pause between two checks of a condition, in seconds.
POLL_INTERVAL = 0.05
#: Seconds a process gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: Seconds a short command (makemigrations, migrate, a producer) may take.
COMMAND_TIMEOUT = 300.0
#: Seconds the 1.3.1 venv may take to be created and installed.
VENV_TIMEOUT = 900.0


class BenchmarkError(RuntimeError):
    """A workload could not be measured (a process failed, a condition was not reached)."""


# --- database server --------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """The PostgreSQL server of ``--database-url``; the database named in it is only used to
    connect for CREATE/DROP DATABASE."""

    host: str
    port: str
    user: str
    password: str
    dbname: str
    options: dict[str, str]

    @classmethod
    def from_url(cls, url: str) -> Server:
        """``postgres://user:pw@host:port/db`` or the Unix-socket form
        ``postgresql://user:@/db?host=/path/to/socket/dir``."""
        parsed = urlparse(url)
        if parsed.scheme not in ("postgres", "postgresql"):
            raise ValueError(f"Not a PostgreSQL URL: {url!r}")
        options = {key: values[-1] for key, values in parse_qs(parsed.query).items()}
        host = options.pop("host", None) or unquote(parsed.hostname or "")
        port = options.pop("port", None) or str(parsed.port or "")
        return cls(
            host=host,
            port=port,
            user=unquote(parsed.username or "") or options.pop("user", "postgres"),
            password=unquote(parsed.password or ""),
            dbname=unquote(parsed.path.lstrip("/")) or "postgres",
            options=options,
        )

    def params(self, dbname: str | None = None) -> dict[str, Any]:
        """Keyword arguments of ``psycopg2.connect``."""
        params: dict[str, Any] = {"dbname": dbname or self.dbname, "user": self.user}
        if self.host:
            params["host"] = self.host
        if self.port:
            params["port"] = self.port
        if self.password:
            params["password"] = self.password
        params.update(self.options)
        return params

    def connect(self, dbname: str | None = None, autocommit: bool = True):
        conn = psycopg2.connect(**self.params(dbname))
        conn.autocommit = autocommit
        return conn

    def django_env(self, dbname: str, application_name: str) -> dict[str, str]:
        """The BENCH_DB_* variables the benchmark project's settings read."""
        return {
            "BENCH_DB_NAME": dbname,
            "BENCH_DB_HOST": self.host,
            "BENCH_DB_PORT": self.port,
            "BENCH_DB_USER": self.user,
            "BENCH_DB_PASSWORD": self.password,
            "BENCH_DB_OPTIONS": json.dumps({**self.options, "application_name": application_name}),
        }

    def create_database(self, name: str, template: str | None = None) -> None:
        suffix = f" TEMPLATE {quote_ident(template)}" if template else ""
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {quote_ident(name)}{suffix}")
        finally:
            conn.close()

    def drop_database(self, name: str) -> None:
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        finally:
            conn.close()

    def settings(self, names: Iterable[str]) -> dict[str, str]:
        """Server settings (``SHOW``), e.g. ``fsync``: what the writers' commits pay."""
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                values = {}
                for name in names:
                    cursor.execute(f"SHOW {name}")
                    values[name] = cursor.fetchone()[0]
                return values
        finally:
            conn.close()

    def version(self) -> str:
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT version()")
                return cursor.fetchone()[0]
        finally:
            conn.close()


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_database_numbers = itertools.count(1)


class Databases:
    """Fresh databases for runs (``bench_<side>_<pid>_<n>``), each dropped after its run and, as
    a safety net, all at the end."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.created: list[str] = []

    def new_name(self, side: str) -> str:
        return f"bench_{side.replace('-', '_')}_{os.getpid()}_{next(_database_numbers)}"

    def create(self, side: str, template: str | None = None) -> str:
        name = self.new_name(side)
        self.server.create_database(name, template)
        self.created.append(name)
        return name

    def drop(self, name: str) -> None:
        self.server.drop_database(name)
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in list(self.created):
            try:
                self.drop(name)
            except Exception as exc:  # keep dropping the others
                print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)


# --- processes --------------------------------------------------------------------------------


def wait_for(
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    watch: Iterable[Process] = (),
    interval: float = POLL_INTERVAL,
) -> Any:
    """Check ``condition`` every ``interval`` seconds until it returns a true value (returned)
    or ``timeout`` seconds pass (BenchmarkError); a watched process that exits fails at once."""
    deadline = time.monotonic() + timeout
    watched = list(watch)
    while True:
        result = condition()
        if result:
            return result
        for process in watched:
            if not process.alive():
                raise BenchmarkError(
                    f"{process.name} exited with {process.popen.returncode} while waiting for "
                    f"{what}; its log ends with:\n{process.log_tail()}"
                )
        if time.monotonic() >= deadline:
            tails = "".join(f"\n--- {p.name} log:\n{p.log_tail()}" for p in watched)
            raise BenchmarkError(f"Timed out after {timeout:.0f}s waiting for {what}{tails}")
        time.sleep(interval)


#: Clock ticks per second of utime/stime in /proc/<pid>/stat.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def process_cpu_ns(pid: int) -> int | None:
    """CPU time of process ``pid`` in nanoseconds: its CPU-time clock
    (``clock_getcpuclockid(3)`` + ``clock_gettime(2)``), the scheduler's run time of all its
    threads, including those that already ended. None if the process is gone or the clock
    cannot be read."""
    clock = ctypes.c_int()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        return None
    spec = _Timespec()
    if _libc.clock_gettime(clock, ctypes.byref(spec)) != 0:
        return None
    return spec.tv_sec * 1_000_000_000 + spec.tv_nsec


@dataclass(frozen=True)
class CpuSample:
    """CPU time of a process tree at one instant, three ways: per process, in nanoseconds, from
    its CPU-time clock (threads that ended included); per thread, in nanoseconds, from
    ``/proc/<pid>/task/<tid>/schedstat``; and for the whole tree in clock ticks (utime + stime
    of ``/proc/<pid>/stat``, 10 ms each on most kernels)."""

    threads: dict[tuple[int, int], int]  # (pid, tid) -> nanoseconds on a CPU
    ticks: int
    processes: dict[int, int] = field(default_factory=dict)  # pid -> nanoseconds (CPU clock)

    def seconds_until(self, later: CpuSample) -> tuple[float, str]:
        """CPU seconds used between this sample and ``later``, and the resolution it was
        measured with: "ns" from the processes' CPU clocks when every process of this sample is
        still there (a process that started in between counts from its start), else from the
        per-thread schedstat sum unless a thread ended in between (its time is then gone from
        the sum), else "tick": clock ticks."""
        if self.processes and later.processes and self.processes.keys() <= later.processes.keys():
            nanoseconds = sum(
                runtime - self.processes.get(pid, 0) for pid, runtime in later.processes.items()
            )
            return nanoseconds / 1e9, "ns"
        if self.threads and later.threads and self.threads.keys() <= later.threads.keys():
            nanoseconds = sum(
                runtime - self.threads.get(key, 0) for key, runtime in later.threads.items()
            )
            return nanoseconds / 1e9, "ns"
        return (later.ticks - self.ticks) / CLOCK_TICKS, "tick"


def _stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3 onwards)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def parent_of(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, IndexError, ValueError):
        return None


def cpu_sample(pids: Iterable[int]) -> CpuSample:
    """The CPU time used so far by the processes ``pids`` (see ``CpuSample``); a process that
    is gone counts nothing."""
    threads: dict[tuple[int, int], int] = {}
    processes: dict[int, int] = {}
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        if (runtime := process_cpu_ns(pid)) is not None:
            processes[pid] = runtime
        try:
            tids = [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:
            continue
        for tid in tids:
            try:
                runtime = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]
            except (OSError, IndexError):
                continue
            threads[(pid, tid)] = int(runtime)
    return CpuSample(threads, ticks, processes)


def _status(pid: int, field: str) -> int:
    """A number of ``/proc/<pid>/status`` (``VmRSS`` in kB, ``Threads``); 0 if the process is
    gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (``VmRSS``)."""
    return _status(pid, "VmRSS") * 1024


def thread_count(pid: int) -> int:
    return _status(pid, "Threads")


def voluntary_switches(pids: Iterable[int]) -> int:
    """How many times the threads of ``pids`` gave up the CPU to wait (a blocking call, a
    sleep, a timeout) so far: each wake-up of an idle thread is one. Threads that ended are not
    counted."""
    total = 0
    for pid in pids:
        try:
            tids = [entry.name for entry in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:
            continue
        for tid in tids:
            try:
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


class Process:
    """A subprocess in its own session (so it and any child it spawns are stopped together),
    its output in a log file."""

    def __init__(self, name: str, args: list[str], cwd: Path, env: dict[str, str], log: Path):
        self.name = name
        self.log_path = log
        #: The Unix socket a web server (gunicorn) listens on.
        self.socket: Path | None = None
        self.started = time.perf_counter()
        self.started_at = time.time()  # epoch, to compare with the times the listeners record
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                args,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM to the process group, then SIGKILL after ``timeout`` seconds."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"warning: {self.name} ignored SIGTERM; killing it", file=sys.stderr)
        # Children left behind (a spawned listener whose parent already exited) go too.
        self._signal_group(signal.SIGKILL)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"warning: {self.name} (pid {self.pid}) did not die", file=sys.stderr)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def tree(self) -> list[int]:
        """This process and its descendants (1.3.1's ``listen`` spawns its listener)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def cpu_sample(self) -> CpuSample:
        """The CPU time used so far by the live process tree (see ``CpuSample``)."""
        return cpu_sample(self.tree())

    def rss_bytes(self) -> int:
        """Resident memory of the live process tree."""
        return sum(rss_bytes(pid) for pid in self.tree())

    def children(self) -> list[int]:
        """The live processes this one started (gunicorn's workers)."""
        return [pid for pid in self.tree() if pid != self.pid and parent_of(pid) == self.pid]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Processes:
    """Every process the runner started; ``stop_all()`` runs whatever happened."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[Process] = []
        self._numbers = itertools.count(1)

    def start(self, name: str, args: list[str], cwd: Path, env: dict[str, str]) -> Process:
        log = self.logs / f"{next(self._numbers):03d}-{name}.log"
        process = Process(name, args, cwd, env, log)
        self.running.append(process)
        return process

    def stop(self, process: Process) -> None:
        process.stop()
        if process in self.running:
            self.running.remove(process)

    def run(
        self, name: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float
    ) -> str:
        """Run a command to completion (stopped after ``timeout`` seconds); its output."""
        process = self.start(name, args, cwd, env)
        try:
            try:
                process.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                raise BenchmarkError(
                    f"{name} did not finish within {timeout:.0f}s; its log ends with:\n"
                    f"{process.log_tail()}"
                ) from None
            if process.popen.returncode != 0:
                raise BenchmarkError(
                    f"{name} failed with exit code {process.popen.returncode}:\n"
                    f"{process.log_tail()}"
                )
            return process.log_path.read_text(errors="replace")
        finally:
            self.stop(process)

    def stop_all(self) -> None:
        for process in list(self.running):
            self.stop(process)


# --- the sides --------------------------------------------------------------------------------


@dataclass
class Side:
    """One implementation under test: its Python, the project generated for it, and the
    migrated template database each run's fresh database is copied from."""

    name: str  # OURS, OURS_PSYCOPG3 or THEIRS
    python: str
    project: Path
    pythonpath: str | None
    versions: dict[str, str] = field(default_factory=dict)
    template_db: str = ""

    def base_env(self) -> dict[str, str]:
        """The runner's environment with the side's ``PYTHONPATH`` and settings module."""
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE", "VIRTUAL_ENV", "PYTHONHOME")
        }
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        env["DJANGO_SETTINGS_MODULE"] = "benchsite.settings"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    @property
    def checkout(self) -> bool:
        """Whether this side runs this checkout (with either driver), not django-pgpubsub
        1.3.1."""
        return self.name != THEIRS

    def env(self, server: Server, dbname: str, application_name: str) -> dict[str, str]:
        return {**self.base_env(), **server.django_env(dbname, application_name)}

    def manage(self, *args: str) -> list[str]:
        return [self.python, str(self.project / "manage.py"), *args]

    def script(self, name: str, *args: str) -> list[str]:
        return [self.python, str(self.project / name), *args]


def ensure_venv(
    venv_dir: Path, requirements: list[str] | tuple[str, ...], processes: Processes, label: str
) -> str:
    """A venv with ``requirements`` from PyPI (made once; reused while its marker exists).
    Returns its python. ``label`` names the steps' logs."""
    python = venv_dir / "bin" / "python"
    marker = venv_dir / ".pgpubsub-bench-ready"
    if marker.exists() and python.exists():
        return str(python)
    if venv_dir.exists():
        shutil.rmtree(venv_dir)
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"Creating {venv_dir} with {' '.join(requirements)} ...", file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    base = getattr(sys, "_base_executable", sys.executable)
    processes.run(f"venv{label}", [base, "-m", "venv", str(venv_dir)], ROOT, env, VENV_TIMEOUT)
    processes.run(
        f"pip-install{label}",
        [str(python), "-m", "pip", "install", "--quiet", *requirements],
        ROOT,
        env,
        VENV_TIMEOUT,
    )
    marker.write_text("\n".join(requirements) + "\n")
    return str(python)


def ensure_theirs_venv(venv_dir: Path, processes: Processes) -> str:
    """A venv with django-pgpubsub 1.3.1 from PyPI (made once); returns its python."""
    return ensure_venv(venv_dir, THEIRS_REQUIREMENTS, processes, "")


def _psycopg3_install() -> list[str]:
    """What the venv of ``ensure_psycopg3_venv`` installs: this checkout, editable, with its
    ``psycopg`` extra (``psycopg[binary]``), and gunicorn."""
    return ["--editable", f"{ROOT}[psycopg]", *PSYCOPG3_REQUIREMENTS]


def _psycopg3_marker_text() -> str:
    """What the venv's marker records: the install arguments and a digest of this checkout's
    ``pyproject.toml`` (its dependencies). Another checkout, or changed dependencies, install
    again."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    return "\n".join([*_psycopg3_install(), f"pyproject.toml sha256 {digest}"]) + "\n"


def ensure_psycopg3_venv(venv_dir: Path, processes: Processes) -> str:
    """A venv with this checkout installed editable with psycopg 3 (``psycopg[binary]``) and
    without psycopg2, so that Django's PostgreSQL backend uses psycopg 3. Made once and reused
    while its marker matches (this checkout's path and ``pyproject.toml``); otherwise the
    install runs again. Returns its python."""
    python = venv_dir / "bin" / "python"
    marker = venv_dir / ".pgpubsub-bench-ready"
    wanted = _psycopg3_marker_text()
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    # Runners (or test sessions) starting at once wait for the one making the venv.
    with open(venv_dir.parent / f"{venv_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and marker.exists() and marker.read_text() == wanted:
            return str(python)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        if not python.exists():
            if venv_dir.exists():
                shutil.rmtree(venv_dir)
            base = getattr(sys, "_base_executable", sys.executable)
            processes.run("venv", [base, "-m", "venv", str(venv_dir)], ROOT, env, VENV_TIMEOUT)
        marker.unlink(missing_ok=True)
        install = _psycopg3_install()
        print(f"Installing {' '.join(install)} into {venv_dir} ...", file=sys.stderr)
        processes.run(
            "pip-install-psycopg3",
            [str(python), "-m", "pip", "install", "--quiet", *install],
            ROOT,
            env,
            VENV_TIMEOUT,
        )
        # Django picks psycopg 3 when both are importable; psycopg2 has no place here anyway.
        processes.run(
            "pip-uninstall-psycopg2",
            [str(python), "-m", "pip", "uninstall", "--yes", "psycopg2", "psycopg2-binary"],
            ROOT,
            env,
            VENV_TIMEOUT,
        )
        marker.write_text(wanted)
    return str(python)


_VERSIONS_SCRIPT = """
import json, sys, importlib.metadata as m
out = {"python": sys.version.split()[0]}
for dist in ("django", "django-pgtrigger", "psycopg2-binary", "psycopg", "psycopg-binary",
             "django-pgpubsub", "pgpubsub"):
    try:
        out[dist] = m.version(dist)
    except m.PackageNotFoundError:
        pass
try:  # the driver Django picks: psycopg 3 when installed
    from django.db.backends.postgresql.psycopg_any import is_psycopg3
    out["driver"] = "psycopg 3" if is_psycopg3 else "psycopg2"
except ImportError:
    out["driver"] = "psycopg2"
import pgpubsub
out["pgpubsub from"] = pgpubsub.__file__
print(json.dumps(out))
"""


def prepare_side(side: Side, server: Server, databases: Databases, processes: Processes) -> None:
    """Copy the project, make its migrations and migrate the side's template database."""
    shutil.copytree(TEMPLATE, side.project, ignore=shutil.ignore_patterns("__pycache__"))
    (side.project / "benchapp" / "migrations").mkdir()
    (side.project / "benchapp" / "migrations" / "__init__.py").write_text("")
    side.template_db = databases.create(side.name)
    env = side.env(server, side.template_db, f"bench-{side.name}-setup")
    output = processes.run(
        f"{side.name}-versions",
        [side.python, "-c", _VERSIONS_SCRIPT],
        side.project,
        env,
        COMMAND_TIMEOUT,
    )
    side.versions = json.loads(output.strip().splitlines()[-1])
    if side.checkout:
        side.versions["pgpubsub"] = f"{side.versions.get('pgpubsub', '?')} ({git_revision()})"
    if side.name == OURS_PSYCOPG3:
        # Its venv installed this checkout editable: from here, with psycopg 3 only.
        checkout = str(ROOT / "pgpubsub" / "__init__.py")
        if side.versions["pgpubsub from"] != checkout:
            raise BenchmarkError(
                f"{side.name} imports pgpubsub from {side.versions['pgpubsub from']}, not from "
                f"this checkout ({checkout}): delete {Path(side.python).parent.parent}"
            )
        if side.versions.get("driver") != "psycopg 3":
            raise BenchmarkError(
                f"{side.name} ({side.python}) runs Django with {side.versions.get('driver')}, "
                "not psycopg 3"
            )
    processes.run(
        f"{side.name}-makemigrations",
        side.manage("makemigrations", "benchapp", "--noinput"),
        side.project,
        env,
        COMMAND_TIMEOUT,
    )
    processes.run(
        f"{side.name}-migrate",
        side.manage("migrate", "--noinput"),
        side.project,
        env,
        COMMAND_TIMEOUT,
    )


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown revision"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown revision"


# --- the engine -------------------------------------------------------------------------------

#: Web workers gunicorn runs in the embedded workloads, and worker threads of each one's Runtime
#: (``PGPUBSUB_WORKERS``, its default).
EMBEDDED_WEB_WORKERS = 2
EMBEDDED_THREADS = 2

_socket_numbers = itertools.count(1)


@dataclass(frozen=True)
class Engine:
    """What processes the notifications of a run.

    - ``manage.py listen`` (``embedded=False``): ``--processes N`` when ``processes`` > 1,
      ``--threads N`` when ``threads`` > 1, ``--recover`` when the workload asks for it;
    - the embedded Runtime (``embedded=True``): gunicorn serving the benchmark project with
      ``processes`` sync workers and ``PGPUBSUB_EMBEDDED = True``, each worker running a Runtime
      with ``threads`` worker threads (``PGPUBSUB_WORKERS``). It always recovers at start
      (``PGPUBSUB_RECOVER_ON_START``, on by default).

    ``processes`` is also the number of processes that LISTEN (and so receive each plain
    message), which the runner waits for before it measures.
    """

    embedded: bool = False
    processes: int = 1
    threads: int = 1

    def describe(self) -> str:
        if self.embedded:
            return (
                f"gunicorn, {self.processes} sync workers, PGPUBSUB_EMBEDDED, "
                f"{self.threads} worker threads each"
            )
        return "`" + " ".join(["listen", *self.listen_args()]) + "`"

    def listen_args(self, recover: bool = False) -> list[str]:
        args = ["--recover"] if recover else []
        if self.processes > 1:
            args += ["--processes", str(self.processes)]
        if self.threads > 1:
            args += ["--threads", str(self.threads)]
        return args

    def for_side(self, side: Side) -> Engine | None:
        """The engine ``side`` runs this workload with; None when it cannot. This checkout
        (with either driver) runs it as it is. django-pgpubsub 1.3.1 has no ``--threads`` and
        no embedded mode: an embedded workload runs its ``listen --processes N`` (as many
        processes receiving each notification); a ``--threads`` workload does not run."""
        if side.checkout:
            return self
        if self.embedded:
            return Engine(processes=self.processes)
        return None if self.threads > 1 else self

    def start(
        self,
        processes: Processes,
        server: Server,
        side: Side,
        dbname: str,
        recover: bool = False,
        env: dict[str, str] | None = None,
    ) -> Process:
        """Start the engine on ``dbname``; ``env`` adds variables (the no-op listeners'
        ``BENCH_EXPECTED`` and ``BENCH_RESULT_DIR``)."""
        if self.embedded:
            return self.start_web(processes, server, side, dbname, embedded=True, env=env)
        args = side.manage("listen", *self.listen_args(recover))
        full_env = {**side.env(server, dbname, f"bench-{side.name}-listener"), **(env or {})}
        return processes.start(f"{side.name}-listen", args, side.project, full_env)

    def start_web(
        self,
        processes: Processes,
        server: Server,
        side: Side,
        dbname: str,
        embedded: bool,
        env: dict[str, str] | None = None,
    ) -> Process:
        """gunicorn with ``processes`` sync workers serving the benchmark project, with
        ``PGPUBSUB_EMBEDDED`` on or off (everything else the same); ``env`` adds variables."""
        # A Unix socket in the project directory: no port to find, none to collide with.
        socket = side.project / f"gunicorn-{next(_socket_numbers)}.sock"
        args = [
            side.python,
            "-m",
            "gunicorn",
            "--workers",
            str(self.processes),
            "--worker-class",
            "sync",
            "--bind",
            f"unix:{socket}",
            "--log-level",
            "warning",
            "benchsite.wsgi:application",
        ]
        full_env = side.env(server, dbname, f"bench-{side.name}-web")
        full_env["BENCH_EMBEDDED"] = "1" if embedded else "0"
        full_env["BENCH_PGPUBSUB_WORKERS"] = str(self.threads)
        full_env.update(env or {})
        process = processes.start(f"{side.name}-gunicorn", args, side.project, full_env)
        process.socket = socket
        return process


def ensure_gunicorn(side: Side, cache: Path, processes: Processes) -> None:
    """Make gunicorn importable by the side's Python: as it is, when it is installed there;
    else installed once from PyPI into ``cache`` (``pip install --target``), which goes on the
    side's ``PYTHONPATH`` (the runner's environment itself is left as it is)."""
    env = side.base_env()
    check = [side.python, "-c", "import gunicorn"]
    if subprocess.run(check, env=env, capture_output=True, timeout=COMMAND_TIMEOUT).returncode == 0:
        side.versions.setdefault("gunicorn", _gunicorn_version(side, env))
        return
    target = cache / f"gunicorn-py{side.versions.get('python', 'unknown')}"
    marker = target / ".pgpubsub-bench-ready"
    if not marker.exists():
        if target.exists():
            shutil.rmtree(target)
        print(f"Installing gunicorn into {target} ...", file=sys.stderr)
        processes.run(
            "pip-install-gunicorn",
            [side.python, "-m", "pip", "install", "--quiet", "--target", str(target), "gunicorn"],
            ROOT,
            env,
            VENV_TIMEOUT,
        )
        marker.write_text("gunicorn\n")
    side.pythonpath = os.pathsep.join(p for p in (str(target), side.pythonpath) if p)
    side.versions["gunicorn"] = _gunicorn_version(side, side.base_env())


def _gunicorn_version(side: Side, env: dict[str, str]) -> str:
    out = subprocess.run(
        [side.python, "-c", "import gunicorn; print(gunicorn.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    if out.returncode != 0:
        raise BenchmarkError(f"gunicorn is not importable by {side.python}:\n{out.stderr}")
    return out.stdout.strip()
