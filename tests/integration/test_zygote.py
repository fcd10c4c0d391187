"""tests/zygote.py, which forks the vLLM worker runs of test_vllm.py, with a toy run: a client
gets its run's output, input and exit status, and a killed client takes its run with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import zygote
from paths import TESTS

HERE = TESTS
# The toy run: prints its arguments, answers a line of stdin, fails or waits when asked.
SERVER = """
import os, sys, time
import zygote

def run(argv):
    print("args", argv, flush=True)
    print("pid", os.getpid(), flush=True)
    if argv[0] == "echo":
        print("read", sys.stdin.readline().strip())
    elif argv[0] == "fail":
        raise ValueError("a toy failure")
    elif argv[0] == "exit":
        sys.exit(int(argv[1]))
    elif argv[0] == "wait":
        time.sleep(60)

zygote.serve(sys.argv[1], run)
"""
CLIENT = "import sys, zygote; sys.exit(zygote.client(sys.argv[1], sys.argv[2:]))"


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "socket")
    with zygote.running([sys.executable, "-c", SERVER, path], path, timeout_s=30, cwd=HERE):
        yield path


def client(path: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLIENT, path, *args],
        cwd=HERE,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_client_gets_its_runs_output_input_and_status(socket_path: str) -> None:
    echo = client(socket_path, "echo", stdin="hello\n")
    assert echo.returncode == 0 and "args ['echo']" in echo.stdout and "read hello" in echo.stdout
    again = client(socket_path, "echo", stdin="again\n")
    pids = {line for r in (echo, again) for line in r.stdout.splitlines() if "pid" in line}
    assert len(pids) == 2  # a process of its own for each run
    assert client(socket_path, "exit", "3").returncode == 3
    failed = client(socket_path, "fail")
    assert failed.returncode == 1 and "ValueError: a toy failure" in failed.stderr


def test_a_killed_client_kills_its_run(socket_path: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, socket_path, "wait"],
        cwd=HERE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "args ['wait']": the run has started
    pid = int(proc.stdout.readline().split()[1])
    os.kill(pid, 0)  # running
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the run outlived its client"
