"""SIGTERM (what systemd, Docker and supervisors send) to a long-running command stops it with everything it started.

Each command runs as `python -m minimind ...` in a session of its own on 127.0.0.1, with a tiny model; the signal
goes to that one process, never to its group. Afterwards no process of the session may be left (a Streamlit server
outliving `minimind web` kept serving the model) and the port must take a new listener.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import tokenizer_dir
from web_helpers import save_tiny_model

STOP_WITHIN = 10.0  # seconds from SIGTERM until the session is empty and the port free
START_WITHIN = 120.0  # a shared machine may be slow to import Gradio or Streamlit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    """A new server can listen on the port (SO_REUSEADDR, as servers bind: closed connections do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


def _session_processes(sid: int) -> list[str]:
    """Live (non-zombie) processes of session `sid`, as "pid comm"; read from /proc (a zombie holds no memory and
    no port, and whether one is reaped depends on this machine's init)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        state, session = rest[0], int(rest[3])  # fields 3 and 6 of proc_pid_stat(5)
        if session == sid and state != "Z":
            found.append(f"{entry.name} {comm}")
    return found


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m minimind ARGS` in a new session, stdin a pipe that stays open, output to `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "wb") as out:  # a file, not a pipe nobody reads: a chatty server never blocks on it
        return subprocess.Popen([sys.executable, "-m", "minimind", *args], stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_until(ready, proc: subprocess.Popen, log: Path) -> None:
    """Polls ready() until it is true; kills the session if the command exits first or never gets ready."""
    deadline = time.monotonic() + START_WITHIN
    try:
        while not ready():
            assert proc.poll() is None, f"exited with {proc.returncode} before it was ready:\n{_text(log)}"
            assert time.monotonic() < deadline, f"not ready after {START_WITHIN:.0f} s:\n{_text(log)}"
            time.sleep(0.3)
    except BaseException:
        _kill_session(proc)
        raise


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _text(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    proc.stdin.close()


def _terminate_and_check(proc: subprocess.Popen, port: int | None, log: Path, code: int | None = None) -> None:
    """SIGTERM to the process alone; then the session must empty and the port free up within STOP_WITHIN, and the
    process exit with `code` (None: any, e.g. killed by the signal's default action)."""
    sid = proc.pid  # start_new_session: the session id is the leader's pid
    try:
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WITHIN
        exited, left, free = False, ["?"], False
        while time.monotonic() < deadline:
            # waitpid: its threads are all gone (a dying process's leader is a zombie while other threads finish)
            exited = proc.poll() is not None
            left = _session_processes(sid)
            free = port is None or _port_free(port)
            if exited and not left and free:
                break
            time.sleep(0.2)
        assert exited, f"still running {STOP_WITHIN:.0f} s after SIGTERM\n{_text(log)}"
        assert not left, f"left behind {STOP_WITHIN:.0f} s after SIGTERM: {left}\n{_text(log)}"
        assert free, f"port {port} still taken {STOP_WITHIN:.0f} s after SIGTERM\n{_text(log)}"
        assert code is None or proc.returncode == code, f"exit code {proc.returncode}\n{_text(log)}"
    finally:  # never leave a server behind, whatever failed
        _kill_session(proc)
    assert "Traceback" not in _text(log), _text(log)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[str, str]:
    tok = tokenizer_dir("minimind2")
    return str(save_tiny_model(tmp_path_factory.mktemp("signals"))), str(tok)


@pytest.mark.parametrize("ui, ready_path", [("streamlit", "/_stcore/health"), ("gradio", "/")])
def test_web_sigterm_leaves_no_process_and_frees_the_port(ui, ready_path, tiny_model, tmp_path):
    pytest.importorskip(ui, reason=f"the {ui} package is not installed (minimind[web])")
    model, tok = tiny_model
    port, log = _free_port(), tmp_path / f"{ui}.log"
    proc = _start(["web", "--ui", ui, "--model", model, "--tokenizer", tok, "--port", str(port)], log)
    _wait_until(lambda: _answers(f"http://127.0.0.1:{port}{ready_path}"), proc, log)
    _terminate_and_check(proc, port, log, code=0)  # a server stopped on SIGTERM as on Ctrl-C: a clean stop


def test_chat_sigterm_at_the_prompt_exits_without_traceback(tiny_model, tmp_path):
    model, tok = tiny_model
    log = tmp_path / "chat.log"
    proc = _start(["chat", "--model", model, "--tokenizer", tok, "--mode", "1"], log)
    _wait_until(lambda: "💬: " in _text(log), proc, log)  # reading stdin
    _terminate_and_check(proc, None, log)
