"""A process that imports vLLM once and forks a fresh engine process for each worker run.

On CPU hosts importing vLLM costs 10-20 s of one core, most of a worker run's time; the
engine, its KV cache and kvtier's stores are built only after the fork, so every run is still
an engine process of its own that starts with empty tiers (what the tests need). A run is
asked for by a light client process (``vllm_worker.py`` when ``ENV`` names the socket), which
hands over its stdin, stdout and stderr and exits with the run's status, so callers drive it
exactly as they would drive the worker itself: ``subprocess.run``, pipes, ``kill()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

ENV = "KVTIER_TEST_ZYGOTE"  # the socket of the running zygote, for the clients


@contextlib.contextmanager
def running(
    command: list[str], path: str, timeout_s: float, cwd: Path | None = None
) -> Iterator[str]:
    """``command`` (a zygote serving ``path``) from the moment its socket listens; ``path``."""
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, cwd=cwd)
    try:
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(path):
            assert proc.poll() is None, f"the zygote ended at start: {command}"
            assert time.monotonic() < deadline, f"the zygote did not listen in {timeout_s:.0f} s"
            time.sleep(0.05)
        yield path
    finally:
        proc.kill()
        proc.wait()


def client(path: str, argv: list[str]) -> int:
    """Runs ``argv`` in a process forked by the zygote at ``path``; its exit status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        socket.send_fds(conn, [json.dumps(argv).encode()], [0, 1, 2])
        reply = b""
        while chunk := conn.recv(64):
            reply += chunk
    status = int(reply or b"1")
    if status < 0:  # killed by a signal: so is this process, for the caller to see
        os.kill(os.getpid(), -status)
    return status


def serve(path: str, run: Callable[[list[str]], None]) -> None:
    """Forks ``run(argv)`` for every client that connects to ``path``; never returns."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    os.rename(path + ".new", path)  # clients see the socket only once it listens
    listener.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the monitors
    sys.stdout.flush()  # what importing printed must not reach every child's output
    sys.stderr.flush()
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            _monitor(conn, run)
        conn.close()


def _monitor(conn: socket.socket, run: Callable[[list[str]], None]) -> None:
    """Runs one client's request in a child, kills it if the client goes away first, and
    sends the client the child's exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    argv = json.loads(message)
    pid = os.fork()
    if pid == 0:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os._exit(_run(run, argv))
    for fd in fds:
        os.close(fd)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable and not conn.recv(1):  # the client was killed: so is its run
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
    try:
        conn.sendall(str(os.waitstatus_to_exitcode(status)).encode())
    finally:
        os._exit(0)


def _run(run: Callable[[list[str]], None], argv: list[str]) -> int:
    """``run(argv)`` as a script's main: its exit status, a traceback on stderr if it raised."""
    sys.argv = [sys.argv[0], *argv]
    code = 0
    try:
        run(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code
