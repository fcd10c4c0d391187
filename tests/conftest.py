"""Fixtures: real redis-server processes on loopback, started once per session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kvtier.redis_process import RedisClusterProcess, RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcess]:
    with RedisClusterProcess(3) as cluster:
        yield cluster


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing one server never see each other."""
    return f"t{uuid.uuid4().hex[:12]}"
