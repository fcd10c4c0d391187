"""The shared tier's own locks: `kvtier pod`'s redis-server has its default user off and one
ACL user, with a password made at start, that may run only what kvtier sends, on kvtier's
keys. kvtier's Redis tier works as that user (the password read from its file: neither the
URL nor any command line holds it), and refuses a URL that carries a password."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from kvtier import TieredStore
from kvtier.config import RedisTierConfig
from kvtier.errors import ConfigError
from kvtier.redis_process import RedisServer
from kvtier.tiers import MemoryTier, RedisTier

from kvhelpers import CHUNK_TOKENS, NS, SHAPE, chunk, chunks_for, prompt


@pytest.fixture(scope="module")
def locked() -> Iterator[RedisServer]:
    with RedisServer(acl_user="kvtier") as server:
        yield server
        server.close()


def test_only_the_kvtier_user_gets_in_and_only_to_what_kvtier_needs(locked: RedisServer) -> None:
    assert Path(locked.password_file).stat().st_mode & 0o077 == 0
    password = Path(locked.password_file).read_text().strip()
    anonymous = redis.Redis(port=locked.port)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()  # the default user is off
    wrong = redis.Redis(port=locked.port, username="kvtier", password="guess")
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()
    client = locked.client()
    assert client.set("kvtier:v1:ab", b"x") and client.get("kvtier:v1:ab") == b"x"
    for command in (("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"), ("CONFIG", "GET", "*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)  # type: ignore[no-untyped-call]
    for command in (("SCAN", "0"), ("ACL", "LIST"), ("SHUTDOWN",), ("SCRIPT", "FLUSH")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)  # type: ignore[no-untyped-call]
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("other:secret", b"x")  # outside kvtier's prefix
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    assert password not in ps and f"redis-server 127.0.0.1:{locked.port}" in ps


def test_the_redis_tier_works_as_the_acl_user(locked: RedisServer) -> None:
    tokens = prompt(31, 3)
    config = RedisTierConfig(
        url=locked.url, username=locked.username, password_file=locked.password_file
    )
    tier = RedisTier(config.url, username=config.username, password_file=config.password_file)
    with TieredStore([MemoryTier(1 << 20), tier], CHUNK_TOKENS) as store:
        store.put(tokens, NS, chunks_for(31, 3))
        store.flush()
    fresh = RedisTier(locked.url, username="kvtier", password_file=locked.password_file)
    with TieredStore([MemoryTier(1 << 20), fresh], CHUNK_TOKENS) as store:
        dests = [np.zeros(SHAPE, dtype=np.float16) for _ in range(3)]
        assert store.get_into(tokens, NS, dests).tiers == ["redis"] * 3  # the bulk reader too
        assert np.array_equal(dests[1], chunk(31001).numpy())
    no_password = RedisTier(locked.url)
    with TieredStore([MemoryTier(1 << 20), no_password], CHUNK_TOKENS) as store:
        assert store.lookup(tokens, NS).tiers == []  # refused: a miss, not a failure


def test_a_password_in_the_url_or_an_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no user or password in the URL"):
        RedisTierConfig(url="redis://kvtier:hunter2@127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match="cannot read") as err:
        RedisTier("redis://127.0.0.1:6379/0", password_file=str(tmp_path / "missing"))
    assert "missing" in str(err.value)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        RedisTier("redis://127.0.0.1:6379/0", password_file=str(empty))
