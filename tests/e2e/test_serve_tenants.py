"""Tenants through `kvtier serve --tenants FILE`, the real server over HTTP, with the tenants
file and keys made by the README's commands and its client snippet run as written: a prompt a
tenant sent before hits for that tenant (from vLLM's cache, then after a restart from kvtier's
disk tier) and never for another tenant, even one that sends the victim's own `cache_salt`,
nor for a request without a key; an unknown key is refused with 401.

Apart from the other engine tests so that the test processes share them out.
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kvtier.errors import KvtierError
from kvtier.integrations.model import DEFAULT_MODEL_NAME
from kvtier.redis_process import free_port
from kvtier.runtime.engine_process import Server, kvtier_serve_command
from kvtier.tenants import new_key

from paths import README

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")

PROMPT = " ".join(f"Line {i} of acme's confidential design notes." for i in range(60))


def readme_block(language: str, marker: str) -> str:
    blocks: list[str] = re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)
    return next(b for b in blocks if marker in b)


def make_tenants(where: Path) -> dict[str, str]:
    """The README's commands, run as written in ``where``, and a third tenant the same way;
    each tenant's key, from its key file."""
    lines = readme_block("sh", "kvtier tenants key").splitlines()
    setup = [ln for ln in lines if not ln.startswith("kvtier serve")]
    assert len(setup) == 3 and any(ln.startswith("kvtier serve --tenants") for ln in lines)
    setup.append("kvtier tenants key initech --key-file initech.key >> tenants.yaml")
    kvtier = shlex.quote(str(Path(sys.executable).parent / "kvtier"))
    script = "\n".join(["set -e", *(ln.replace("kvtier ", f"{kvtier} ", 1) for ln in setup)])
    subprocess.run(["bash", "-c", script], cwd=where, check=True, timeout=120)
    assert (where / "acme.key").stat().st_mode & 0o077 == 0  # the owner's alone
    return {t: (where / f"{t}.key").read_text().strip() for t in ("acme", "globex", "initech")}


def serve(tmp_path: Path, log: str) -> Server:
    port = free_port()
    tenants = tmp_path / "tenants.yaml"
    options = ["--disk", str(tmp_path / "chunks"), "--dram", "256MiB", "--tenants", str(tenants)]
    command = kvtier_serve_command(port, *options, "--max-model-len", "4096", "--dtype", "float32")
    return Server(command, port, tmp_path / log, env={"VLLM_CPU_KVCACHE_SPACE": "1"})


def tenant_hits(
    server: Server, kinds: tuple[str, ...] = ("hit", "vllm_prefix")
) -> dict[str, float]:
    """Cached prompt tokens by tenant, from the engine's /metrics: kvtier's hits
    (kvtier:tenant_hit_tokens_total) and vLLM's own prefix cache's."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    found: dict[str, float] = {}
    names = "|".join(kinds)
    series = re.compile(
        rf'^kvtier:tenant_(?:{names})_tokens_total\{{[^}}]*tenant="([^"]+)"[^}}]*\}} (\S+)$', re.M
    )
    for match in series.finditer(text):
        found[match[1]] = found.get(match[1], 0.0) + float(match[2])
    return found


def wait_for_tenant_hits(
    server: Server, tenants: tuple[str, ...], kinds: tuple[str, ...] = ("hit", "vllm_prefix")
) -> dict[str, float]:
    """The counts once every one of ``tenants`` has some (stats come every few steps)."""
    deadline = time.monotonic() + 20
    while True:
        hits = tenant_hits(server, kinds)
        if all(hits.get(t) for t in tenants) or time.monotonic() > deadline:
            return hits
        time.sleep(0.5)


def cached(
    server: Server, key: str | None, salt: str | None = "acme-project", prompt: str = PROMPT
) -> int:
    extra: dict[str, Any] = {"cache_salt": salt} if salt else {}
    done = server.complete(prompt, max_tokens=2, api_key=key, **extra)
    assert done.prompt_tokens > 300 and done.cached_tokens is not None
    return done.cached_tokens


def fuzz_authentication(server: Server, acme: str, globex: str) -> None:
    """Bad, empty, huge and repeated Authorization headers, through the real server: never a
    5xx, and a request is served as acme exactly when its one header carries acme's key. Each
    case sends a prompt acme alone sent just before: a hit says acme's cache served it."""
    valid = [f"Bearer {acme}", f"bearer {acme}", f"Bearer   {acme}  "]
    invalid: list[list[str]] = [
        [""],
        ["Bearer"],
        ["Bearer "],
        [f"Basic {acme}"],
        [acme],
        [f"Bearer {acme}x"],
        [f"Bearer {acme} {acme}"],
        [f"Bearer {acme[:-1]}"],
        ["Bearer " + "a" * 20_000],
        ["Bearer \u00e9\u00e8"],
        [f"Bearer {acme}", f"Bearer {globex}"],
        [f"Bearer {globex}", f"Bearer {acme}"],
        [f"Bearer {acme}", f"Bearer {acme}"],
        [f"Bearer {acme}", ""],
    ]
    host, port = server.url[len("http://") :].split(":")
    for n, headers in enumerate([[v] for v in valid] + invalid):
        prompt = " ".join(f"Case {n}, line {i} of acme's private notes." for i in range(40))
        assert cached(server, acme, prompt=prompt) == 0  # now in acme's cache alone
        body = {"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": 1}
        body["cache_salt"] = "acme-project"
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            conn.putrequest("POST", "/v1/completions")
            conn.putheader("Content-Type", "application/json")
            for value in headers:
                conn.putheader("Authorization", value.encode("latin-1", "replace"))
            raw = json.dumps(body).encode()
            conn.putheader("Content-Length", str(len(raw)))
            conn.endheaders(raw)
            reply = conn.getresponse()
            answer = reply.read()
        finally:
            conn.close()
        assert reply.status < 500, (headers[:1], reply.status, answer[:300])
        if n < len(valid):
            assert reply.status == 200, (n, answer[:300])
        else:
            assert reply.status in (400, 401, 431), (n, reply.status, answer[:300])
        if reply.status == 200:
            details = json.loads(answer)["usage"].get("prompt_tokens_details") or {}
            hit = int(details.get("cached_tokens") or 0)
            assert hit > 0, f"case {n} was served, not as acme"


def test_a_tenants_context_hits_for_it_alone_before_and_after_a_restart(tmp_path: Path) -> None:
    keys = make_tenants(tmp_path)
    acme, globex, initech = keys["acme"], keys["globex"], keys["initech"]
    with serve(tmp_path, "first.log") as server:
        client = readme_block("python", "api_key=Path(").replace("127.0.0.1:8000", server.url[7:])
        run = subprocess.run(
            [sys.executable, "-c", client], cwd=tmp_path, capture_output=True, text=True
        )
        assert run.returncode == 0 and run.stdout.strip(), run.stderr[-2000:]
        curl = readme_block("sh", "curl -s -K -").strip().replace("127.0.0.1:8000", server.url[7:])
        run = subprocess.run(["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0 and json.loads(run.stdout)["choices"][0]["text"], run.stdout
        assert cached(server, acme) == 0
        assert cached(server, acme) > 500  # the same tenant hits: caching is on
        assert cached(server, globex) == 0  # the victim's cache_salt, another key
        assert cached(server, None) == 0  # anonymous: a tenant of its own
        assert cached(server, None) > 500  # ... that hits its own
        assert cached(server, acme, salt=None) == 0  # a client salt divides its own cache
        with pytest.raises(KvtierError, match="HTTP 401"):
            cached(server, new_key())
        fuzz_authentication(server, acme, globex)
        # Per tenant, on the engine's /metrics: acme and anonymous hit (vLLM's cache), globex
        # never did.
        hits = wait_for_tenant_hits(server, ("acme", "anonymous"))
        assert hits["acme"] > 500 and hits["anonymous"] > 500 and hits["globex"] == 0, hits
        assert hits["initech"] == 0 and "other" not in hits  # declared at 0; no stray id
    with serve(tmp_path, "second.log") as server:  # vLLM's cache is empty: kvtier's disk
        assert cached(server, initech) == 0  # a tenant that never sent it
        assert cached(server, acme) > 500
        log = server.tail(1 << 20)
        from_kvtier = wait_for_tenant_hits(server, ("acme",), ("hit",))  # from disk, acme's
        assert from_kvtier["acme"] > 500 and from_kvtier["initech"] == 0, from_kvtier
    assert "from disk" in log, log[-3000:]
    for key in (acme, globex, initech):
        assert key not in (tmp_path / "first.log").read_text() + log  # no key in a log
