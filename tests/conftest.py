"""Fixtures: real redis-server and SeaweedFS processes on loopback, started once per session
(per test process when the suite runs in several); a process whose C kernels are not built
yet; and the order in which test files start."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import native, quant, quant4
from kvtier.config import GATE_VAR
from kvtier.redis_process import RedisClusterProcess, RedisServer
from kvtier.seaweed_process import SeaweedFS

# Two test processes run engines side by side on the same cores, and an OpenMP thread that
# spins while it waits takes the core from the other engine's threads (a 60-token prefill took
# 2.3-4.8 s spinning, 0.7-0.8 s asleep, under a second engine's load on 2 cores). The engines
# of `kvtier serve` wait asleep anyway where they share cores (engine_layout); these are the
# tests' own (tests/vllm_worker.py) and the test processes' torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A server without --codec stores the codec the model passed the quality gate with: the gate's
# records on this machine (a `kvtier bench fidelity --gate` run) must not change what the
# tests' servers store. Tests that want a record write their own (GATE_VAR).
os.environ[GATE_VAR] = tempfile.mkdtemp(prefix="kvtier-gate-")


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A process that has not built or checked the C kernels yet, with its own cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checks = (native.library, quant.native_int8, quant4.native_int4r)
    for check in checks:
        check.cache_clear()
    yield
    for check in checks:
        check.cache_clear()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcess]:
    with RedisClusterProcess(3) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedFS]:
    """A private SeaweedFS (S3 API) on loopback ports, for this test process."""
    with SeaweedFS() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing one server never see each other."""
    return f"t{uuid.uuid4().hex[:12]}"


# Files that start vLLM engines, longest first: minutes each, where every other file takes
# seconds. `make test` runs the files in several processes (pytest-xdist, a file to a process, in
# this order); started first, the long ones end about together and the short ones fill in.
LONGEST_FIRST = (
    "test_pod.py",
    "test_vllm.py",
    "test_serve.py",
    "test_bench_ttft.py",
    "test_pod_pd.py",
    "test_bench_chat_pod.py",
    "test_bench_chat.py",
    "test_bench_overlap.py",
    "test_readme_serve.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: else as found
