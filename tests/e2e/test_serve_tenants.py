"""Tenants through `kvtier serve --tenants FILE`, the real server over HTTP: a prompt a tenant
sent before hits for that tenant (from vLLM's cache, then after a restart from kvtier's disk
tier) and never for another tenant, even one that sends the victim's own `cache_salt`, nor for
a request without a key; an unknown key is refused with 401.

Apart from the other engine tests so that the test processes share them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvtier.errors import KvtierError
from kvtier.redis_process import free_port
from kvtier.runtime.engine_process import Server, kvtier_serve_command
from kvtier.tenants import hash_key, new_key

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")

ACME, GLOBEX, INITECH = new_key(), new_key(), new_key()
PROMPT = " ".join(f"Line {i} of acme's confidential design notes." for i in range(60))


def serve(tmp_path: Path, log: str) -> Server:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        "tenants:\n"
        f"  - name: acme\n    keys: [{hash_key(ACME)}]\n"
        f"  - name: globex\n    keys: [{hash_key(GLOBEX)}]\n"
        f"  - name: initech\n    keys: [{hash_key(INITECH)}]\n"
    )
    port = free_port()
    options = ["--disk", str(tmp_path / "chunks"), "--dram", "256MiB", "--tenants", str(tenants)]
    command = kvtier_serve_command(port, *options, "--max-model-len", "4096", "--dtype", "float32")
    return Server(command, port, tmp_path / log, env={"VLLM_CPU_KVCACHE_SPACE": "1"})


def cached(server: Server, key: str | None, salt: str | None = "acme-project") -> int:
    extra: dict[str, Any] = {"cache_salt": salt} if salt else {}
    done = server.complete(PROMPT, max_tokens=2, api_key=key, **extra)
    assert done.prompt_tokens > 600 and done.cached_tokens is not None
    return done.cached_tokens


def test_a_tenants_context_hits_for_it_alone_before_and_after_a_restart(tmp_path: Path) -> None:
    with serve(tmp_path, "first.log") as server:
        assert cached(server, ACME) == 0
        assert cached(server, ACME) > 500  # the same tenant hits: caching is on
        assert cached(server, GLOBEX) == 0  # the victim's cache_salt, another key
        assert cached(server, None) == 0  # anonymous: a tenant of its own
        assert cached(server, None) > 500  # ... that hits its own
        assert cached(server, ACME, salt=None) == 0  # a client salt divides its own cache
        with pytest.raises(KvtierError, match="HTTP 401"):
            cached(server, new_key())
    with serve(tmp_path, "second.log") as server:  # vLLM's cache is empty: kvtier's disk
        assert cached(server, INITECH) == 0  # a tenant that never sent it
        assert cached(server, ACME) > 500
        log = server.tail(1 << 20)
    assert "from disk" in log, log[-3000:]
    for key in (ACME, GLOBEX, INITECH):
        assert key not in (tmp_path / "first.log").read_text() + log  # no key in a log
