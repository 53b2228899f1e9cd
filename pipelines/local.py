"""A local Prefect installation in one step, and stopped again in one step.

    sempa prefect up       # server on 127.0.0.1 (embedded SQLite), work pool, deployments, worker
    prefect deployment run sempa/full --watch
    sempa prefect status
    sempa prefect down     # stops the worker and the server that `up` started

``up`` points the active Prefect profile at the local server (``prefect config set PREFECT_API_URL``),
so plain ``prefect`` commands in any shell reach it. Process ids and logs are kept in
``outputs/prefect/`` (``--state-dir``); ``down`` only stops processes recorded there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sempa_train.core.config import is_loopback

POOL = "sempa-local"
SCHEDULED = ("sempa/refresh",)  # deployments of flows.yaml with a schedule (daily at 03:00 UTC)
PROJECT_DIR = Path(__file__).resolve().parent.parent


class PrefectUnavailableError(RuntimeError):
    """The Prefect server cannot be reached or started."""


@dataclass(frozen=True)
class LocalPrefect:
    """Where the local server listens and where its pids and logs are kept.

    ``host`` is 127.0.0.1 unless the server has to be reached from elsewhere; then ``auth_string_file``
    (a file holding ``user:password``, readable by its owner only) turns on Prefect's basic auth: the
    server gets it as ``PREFECT_SERVER_API_AUTH_STRING``, this machine's clients (worker, deploy, runs)
    as ``PREFECT_API_AUTH_STRING``. A non-loopback host without it is refused.
    """

    port: int = 4200
    state_dir: Path = Path("outputs/prefect")
    pool: str = POOL
    host: str = "127.0.0.1"
    auth_string_file: Path | None = None

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and self.auth_string_file is None:
            raise PrefectUnavailableError(
                f"refusing to start a Prefect server on {self.host} without authentication: anyone who reaches it "
                "can run any deployment with any parameters. Pass --auth-string-file FILE (a file holding "
                "user:password), or keep the default host 127.0.0.1")
        if self.auth_string_file is not None:
            self.auth_string()  # fail early on a missing or empty file

    def auth_string(self) -> str | None:
        """The basic-auth string of the file, or None without one."""
        if self.auth_string_file is None:
            return None
        path = Path(self.auth_string_file)
        if not path.is_file():
            raise PrefectUnavailableError(f"{path}: no such auth string file")
        text = path.read_text(encoding="utf-8").strip()
        if ":" not in text or text.startswith(":") or text.endswith(":"):
            raise PrefectUnavailableError(f"{path}: must hold one line user:password")
        return text

    @property
    def api_url(self) -> str:
        client_host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{client_host}:{self.port}/api"

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PREFECT_API_URL": self.api_url}
        auth = self.auth_string()
        if auth is not None:
            env.update(PREFECT_SERVER_API_AUTH_STRING=auth, PREFECT_API_AUTH_STRING=auth)
        return env

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def prefect(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a ``prefect`` CLI command against this server from the project root."""
        result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=PROJECT_DIR, env=self.env(),
                                capture_output=True, text=True)
        if check and result.returncode != 0:
            raise PrefectUnavailableError(f"`prefect {' '.join(args)}` failed:\n{result.stdout}{result.stderr}")
        return result

    def _pid_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def _start(self, name: str, args: list[str]) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = (self.state_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=PROJECT_DIR, env=self.env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._pid_file(name).write_text(str(proc.pid))
        return proc.pid

    def start_server(self, timeout: float = 120.0) -> None:
        """Start ``prefect server start`` on ``host`` unless one already answers; wait until healthy."""
        if self.healthy():
            return
        self._start("server", ["server", "start", "--host", self.host, "--port", str(self.port)])
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.healthy():
                return
            if not _alive(self._pid("server")):
                break
            time.sleep(1.0)
        tail = _tail(self.state_dir / "server.log")
        self.stop("server")
        raise PrefectUnavailableError(f"the Prefect server did not become healthy at {self.api_url}:\n{tail}")

    def require_server(self) -> None:
        if not self.healthy():
            raise PrefectUnavailableError(
                f"no Prefect server answers at {self.api_url}. Start one with `sempa prefect up` "
                f"(or `prefect server start --host 127.0.0.1 --port {self.port}`)"
            )

    def deploy(self, *, schedules: bool = True) -> None:
        """Create the process work pool (once) and deploy every deployment of flows.yaml; without ``schedules`` the
        scheduled deployments (refresh) get no schedule."""
        self.require_server()
        if self.prefect("work-pool", "inspect", self.pool, check=False).returncode != 0:
            self.prefect("work-pool", "create", self.pool, "--type", "process")
        self.prefect("deploy", "--all", "--prefect-file", "flows.yaml", "--no-prompt")
        if not schedules:
            for name in SCHEDULED:
                self.prefect("deployment", "schedule", "clear", name, "--accept-yes")

    def start_worker(self) -> None:
        if _alive(self._pid("worker")):
            return
        self._start("worker", ["worker", "start", "--pool", self.pool])

    def up(self, *, schedules: bool = True) -> None:
        self.start_server()
        self.prefect("config", "set", f"PREFECT_API_URL={self.api_url}")
        if self.auth_string() is not None:  # so that `prefect deployment run` from this user's shell authenticates
            self.prefect("config", "set", f"PREFECT_API_AUTH_STRING={self.auth_string()}")
        self.deploy(schedules=schedules)
        self.start_worker()

    def _pid(self, name: str) -> int | None:
        path = self._pid_file(name)
        return int(path.read_text()) if path.is_file() else None

    def stop(self, name: str, timeout: float = 20.0) -> None:
        """Stop a process ``up`` started (its whole process group; a worker needs SIGTERM twice)."""
        pid = self._pid(name)
        if pid is not None and _alive(pid):
            for _ in range(2):
                _signal_group(pid, signal.SIGTERM)
                deadline = time.time() + timeout / 2
                while time.time() < deadline and _alive(pid):
                    time.sleep(0.2)
                if not _alive(pid):
                    break
            if _alive(pid):
                _signal_group(pid, signal.SIGKILL)
        self._pid_file(name).unlink(missing_ok=True)

    def down(self) -> None:
        self.stop("worker")
        self.stop("server")

    def status(self) -> dict[str, object]:
        return {"api_url": self.api_url, "server_healthy": self.healthy(),
                "server_pid": self._pid("server"), "worker_pid": self._pid("worker"),
                "worker_running": _alive(self._pid("worker"))}

    def run_deployment(self, name: str, params: dict[str, object] | None = None, timeout: int = 7200) -> int:
        """``prefect deployment run sempa/<name> --watch``; returns its exit code (0 = Completed)."""
        self.require_server()
        args = ["deployment", "run", f"sempa/{name}", "--watch", "--watch-timeout", str(timeout)]
        for key, value in (params or {}).items():
            args += ["--param", f"{key}={json.dumps(value)}"]
        return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=PROJECT_DIR, env=self.env()).returncode


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"
