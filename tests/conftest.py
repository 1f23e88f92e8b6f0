"""Shared fixtures. The autouse ``no_leaks`` fixture fails any test that leaves a
thread or a child process behind: a daemon that leaks is a daemon that dies in
production (the same idea as watchdog's conftest)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from ckptd.remote.stores import Store, open_store

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# Every wait follows an event and returns the moment it happens; its timeout only bounds a failure.
# A two-core CI machine running the suite four wide (torchrun ranks, DeepSpeed, HF) is often ten
# times slower than an idle one, so each timeout a test states is multiplied by SLACK.
SLACK = float(os.environ.get("CKPTD_TEST_SLACK", "4"))


def _children() -> set[int]:
    me = str(os.getpid())
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            out.add(int(entry))
    return out


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``pytest -n N --dist loadgroup`` (make test), the tests that share a module-scoped
    fixture (a torchrun job, a daemon) go to one worker, which makes the fixture once; and the
    slow tests are handed out first."""
    for item in items:
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        shared = [name for name, d in defs.items() if d and d[-1].scope == "module"]
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.nodeid.split('::')[0]}:{shared[0]}"))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # the real-process tests first, the quick ones after: no long test is left to run alone at
        # the end while the other workers idle (a group still runs together, on one worker)
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + 5.0 * SLACK
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        children = _children() - children_before
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in children:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    pytest.fail(f"test leaked threads {[t.name for t in threads]} and child processes {sorted(children)}")


def pythonpath() -> str:
    """The project first, then whatever the caller's ``PYTHONPATH`` already had: a subprocess (a
    daemon, a trainer) must import what its parent could (packages found only through
    ``PYTHONPATH``, as on the GPU machine, where replacing it cost 38 tests "No module named
    watchdog")."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    return os.pathsep.join([str(ROOT), *inherited])


def project_env(**extra: str) -> dict[str, str]:
    """This process's environment for a subprocess of the project: ``pythonpath()``, then ``extra``."""
    return {**os.environ, "PYTHONPATH": pythonpath(), **extra}


def run_py(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run a Python script of the project in a subprocess, capturing output; ``timeout`` x SLACK
    (a CLI that verifies a DeepSpeed tag imports torch, 20 s and more on a loaded CI machine)."""
    env = project_env(**(env or {}))
    return subprocess.run([PYTHON, *args], capture_output=True, text=True, timeout=timeout * SLACK, env=env, **kw)  # type: ignore[call-overload]


def ckptd_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_py("-m", "ckptd.cli", *args, timeout=timeout)


@contextlib.contextmanager
def tmpfs_at(mnt: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``mnt``; the test is skipped loudly where mounting is not allowed."""
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"SKIPPED LOUDLY: cannot mount a tmpfs here ({r.stderr.strip()}); run the tests as root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


_PORTS = itertools.count()


@pytest.fixture(scope="session")
def fsync_shim(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``tests/fsync_shim.c`` built: LD_PRELOAD it for a disk whose fsync fails or is slow."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("a C compiler is needed to build the fsync shim")
    out = tmp_path_factory.mktemp("shim") / "fsync_shim.so"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-o", str(out), str(ROOT / "tests" / "fsync_shim.c"), "-ldl"], check=True
    )
    return str(out)


def free_port() -> int:
    """A TCP port for a test's server (a daemon's metrics, torchrun's store, moto) that nothing
    takes between this call and the server's bind. Not one the kernel picked (port 0): those are
    in its ephemeral range, where every outgoing connection of the parallel workers gets its own
    port, and one did take torchrun's (EADDRINUSE). Instead: below that range (32768 up on Linux),
    a thousand ports a pytest-xdist worker, each handed out once in turn, and free right now."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    base = 20000 + 1000 * (worker % 12)
    for _ in range(1000):
        port = base + next(_PORTS) % 1000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # a server of this worker's still holds it, or something else does
            return port
    raise RuntimeError(f"no free TCP port in {base}-{base + 999}")


class DaemonProc:
    """A real ``ckptd serve`` subprocess on a private socket, state dir and root."""

    def __init__(
        self,
        base: Path,
        extra_config: str = "",
        env: dict[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.preexec = preexec
        self.base = base
        self.root = base / "roots"
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket = str(base / "run" / "ckptd.sock")
        self.state = base / "state"
        self.port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.port}/metrics"
        self.config = base / "ckptd.toml"
        self.config.write_text(
            f'[daemon]\nsocket = "{self.socket}"\nstate_dir = "{self.state}"\n'
            f'metrics_listen = "127.0.0.1:{self.port}"\nroots = ["{self.root}"]\n' + extra_config
        )
        self.env = project_env(**(env or {}))
        self.log = base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "DaemonProc":
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "ckptd.cli", "serve", "--config", str(self.config)],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env=self.env,
            preexec_fn=self.preexec,
        )
        deadline = time.monotonic() + 30 * SLACK
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("daemon did not start:\n" + self.log.read_text())
            time.sleep(0.05)
        return self

    def healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                return bool(r.status == 200) and os.path.exists(self.socket)
        except OSError:
            return False

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=5 * SLACK) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample (0 if absent), parsed with prometheus_client's own parser."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def kill(self, sig: int = 9) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
        if getattr(self, "_logf", None):
            self._logf.close()

    def stop(self) -> int:
        self.kill(15)
        return self.proc.returncode if self.proc else 0


@pytest.fixture
def base() -> Iterator[Path]:
    """A 0755 directory under /tmp that the test's users can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="ckptd-sec-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def open_base(base: Path) -> Path:
    """``base``, by the name tests/test_security.py has always used."""
    return base


@pytest.fixture
def users() -> Iterator[Any]:
    """Real unix users and groups made for this test (``tests/users.py``); removed after it."""
    from tests.users import Users

    if os.geteuid() != 0:
        pytest.skip("needs root to create real users")
    made = Users()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path / "d").start()
    try:
        yield d
    finally:
        d.stop()
        print_log_tail(d.log)


def print_log_tail(log: Path, lines: int = 60) -> None:
    """The end of a daemon's log, in the teardown output pytest shows for a failed test only."""
    with contextlib.suppress(OSError):
        print(f"--- last {lines} lines of {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))


@pytest.fixture
def inproc_daemon(tmp_path: Path) -> Iterator[Any]:
    """The daemon in this process: its logic in milliseconds (no interpreter start, no torch)."""
    from ckptd.core.config import Config
    from ckptd.daemon.app import Daemon

    root = tmp_path / "roots"
    root.mkdir()
    d = Daemon(
        Config(),
        socket_path=str(tmp_path / "d.sock"),
        state_dir=str(tmp_path / "state"),
        metrics_listen=f"127.0.0.1:{free_port()}",
        roots=[str(root)],
    )
    d.start()
    try:
        yield d
    finally:
        d.stop(drain_timeout=10)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll until ``predicate()`` holds; fail after ``timeout`` x SLACK seconds."""
    deadline = time.monotonic() + timeout * SLACK
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def preempt_group(
    p: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    exit_timeout: float,
    settle: float = 0.0,
) -> None:
    """As a scheduler preempts a job started with ``start_new_session=True``: once ``ready()``
    holds (or the job ended) and ``settle`` seconds more have passed, SIGTERM to every process of
    its session, and wait for the end;
    whatever is still running after that (or after a failed wait) is SIGKILLed."""
    import signal

    try:
        wait_until(lambda: ready() or p.poll() is not None, timeout, what)
        time.sleep(settle)
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(exit_timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


class MotoServer:
    """A real S3-compatible server (moto in server mode) on a loopback port, for the remote tier."""

    def __init__(self, base: Path, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.env = {**os.environ, **(env or {})}  # INITIAL_NO_AUTH_ACTION_COUNT=0: credentials are checked
        self.port = port or free_port()  # a restarted server: the same port
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(base / "moto.log", "ab")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "MotoServer":
        import urllib.request

        exe = Path(PYTHON).with_name("moto_server")
        self.proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT, env=self.env
        )
        deadline = time.monotonic() + 30 * SLACK
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def moto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    """A moto S3 server with a bucket ``ckpt``; the test process has (fake) AWS credentials in its env."""
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    server = MotoServer(tmp_path).start()
    try:
        server.client().create_bucket(Bucket="ckpt")
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["s3", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A remote tier of each kind: a moto S3 server on loopback, and ``file://`` on a second filesystem."""
    if request.param == "s3":
        server: MotoServer = request.getfixturevalue("moto")
        request.getfixturevalue("monkeypatch").setenv("CKPT_TEST_ENDPOINT", server.endpoint)  # for its trainers
        yield open_store("s3://ckpt/team/runs", server.endpoint)
    else:
        with tmpfs_at(tmp_path / "shared", "64m") as shared:  # another filesystem than the checkpoints'
            yield open_store(f"file://{shared}/ckpt")
