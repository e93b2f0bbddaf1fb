"""The processes of `minimind bench --server`: child processes (HTTP servers on 127.0.0.1 and a JSON-lines worker)
that are always stopped, even on an error or Ctrl-C. The load generator that streams to them is bench_client.py.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig():
    """prctl(PR_SET_PDEATHSIG, SIGKILL) resolved here, in the parent: the child only calls it (no dlopen or
    import between fork and exec), so a server dies with the bench even if the bench is SIGKILLed."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)


class ChildProcess:
    """A subprocess in its own session, always stopped on exit from `with` (error and Ctrl-C included): SIGTERM
    to its process group, SIGKILL after `stop_timeout`; it also gets SIGKILL if the bench itself dies."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, *, env: dict | None = None,
                 stop_timeout: float = 15.0, pipes: bool = False):
        self.name, self.cmd, self.log_path, self.env = name, cmd, Path(log_path), env
        self.stop_timeout, self.pipes = stop_timeout, pipes
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        with open(self.log_path, "wb") as log:
            pipe = subprocess.PIPE if self.pipes else subprocess.DEVNULL
            self.proc = subprocess.Popen(self.cmd, stdin=pipe, stdout=pipe if self.pipes else log,
                                         stderr=log if self.pipes else subprocess.STDOUT, env=self.env,
                                         start_new_session=True, text=self.pipes,
                                         preexec_fn=_pdeathsig())  # noqa: PLW1509 - only a pre-resolved C call
        try:
            self.ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def ready(self) -> None:
        """Block until the child can take work (subclasses)."""

    def log_tail(self, lines: int = 12) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def died(self) -> RuntimeError:
        return RuntimeError(f"{self.name} exited with code {self.proc.returncode} (log {self.log_path}):\n"
                            f"{self.log_tail()}")

    def peak_rss_mb(self) -> float | None:
        """VmHWM of the child (None once it has exited or off Linux)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            pass
        return None

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)  # its own session: the group is the child and its children only
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


class ServerProcess(ChildProcess):
    """An HTTP server on 127.0.0.1:port, ready once GET /health answers 200."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, port: int, *, env: dict | None = None,
                 ready_timeout: float = 300.0, stop_timeout: float = 15.0):
        super().__init__(name, cmd, log_path, env=env, stop_timeout=stop_timeout)
        self.port, self.ready_timeout = port, ready_timeout
        self.base_url = f"http://127.0.0.1:{port}"

    def ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was ready "
                                   f"(log {self.log_path}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {self.ready_timeout:.0f} s (log {self.log_path}):\n"
                                   f"{self.log_tail()}")
            time.sleep(0.25)


class LineWorker(ChildProcess):
    """A child speaking JSON lines: one request line in, one reply line out (stderr goes to the log)."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, *, env: dict | None = None,
                 timeout: float = 900.0):
        super().__init__(name, cmd, log_path, env=env, pipes=True)
        self.timeout = timeout

    def call(self, message) -> dict:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.proc.wait(timeout=10)
            raise self.died() from None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else None
        if line is None:
            raise TimeoutError(f"{self.name} gave no answer in {self.timeout:.0f} s (log {self.log_path})")
        if not line:
            self.proc.wait(timeout=10)
            raise self.died()
        return json.loads(line)


def find_llama_server(explicit: str | None) -> tuple[str | None, str | None]:
    """-> (path, note). An explicit path (--llama-server or $LLAMA_SERVER) that is not an executable is an
    error; no llama-server at all skips the peer with a note."""
    given = explicit or os.environ.get("LLAMA_SERVER")
    if given:
        path = Path(given).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SystemExit(f"minimind bench --server: llama-server {given!r} (from "
                             f"{'--llama-server' if explicit else '$LLAMA_SERVER'}) is not an executable file")
        return str(path), None
    found = shutil.which("llama-server")
    if found:
        return found, None
    return None, ("llama-server peer skipped: not found (pass --llama-server PATH or set $LLAMA_SERVER; "
                  "`minimind bench --server --help` and docs/benchmarks.md show how to build it)")


def llama_server_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("version", "built"))]
    return "; ".join(lines) or "unknown"


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); q in [0, 100]."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
