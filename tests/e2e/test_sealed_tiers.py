"""Encryption at rest through `kvtier serve`, the real server over HTTP, on its disk tier and on
a real redis-server: every stored chunk is sealed (none of a stored chunk's KV bytes and no
tenant name in any file, key or value), a restarted server still hits them, and tampered
chunks (a flipped byte, a truncated chunk, chunks swapped between keys) are misses counted as
corruptions, answered exactly as a cold server answered.

Apart from the other engine tests so that the test processes share them out.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

from kvtier import codec
from kvtier.keys import ChunkKey
from kvtier.redis_process import RedisServer, free_port
from kvtier.runtime.engine_process import Server, kvtier_serve_command
from kvtier.sealing import MasterKeys, Sealer, new_master_key
from kvtier.tenants import hash_key, load_tenants, new_key, new_secret, tenant_id
from kvtier.tiers.sealed import keyring_record

from paths import README

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")

TENANT = "acme-industries-tenant"  # long enough that no ciphertext holds it by chance
PROMPTS = [
    " ".join(f"Record {i} of ledger {n}: entry noted and filed." for i in range(55))
    for n in range(5)
]  # ~660 tokens each: two whole 256-token chunks and a tail
# Prompt 0's chunks get a flipped byte, 1's are truncated, 2's and 3's swapped between their
# keys; prompt 4's are left alone (it must still hit: caching is on).
UNTOUCHED = 4


class Medium(Protocol):
    """Where a tier's chunks lie, as an attacker with access to it sees them."""

    def names(self) -> set[str]: ...
    def read(self, name: str) -> bytes: ...
    def write(self, name: str, value: bytes) -> None: ...
    def record(self, name: str) -> bytes: ...


class DiskMedium:
    def __init__(self, root: Path):
        self.root = root

    def names(self) -> set[str]:
        return {str(p) for p in self.root.rglob("*.kvc") if p.is_file()}

    def read(self, name: str) -> bytes:
        return Path(name).read_bytes()

    def write(self, name: str, value: bytes) -> None:
        Path(name).write_bytes(value)

    def record(self, name: str) -> bytes:
        return (self.root / "records" / name).read_bytes()


class RedisMedium:
    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)

    def names(self) -> set[str]:
        return {k.decode() for k in self.client.scan_iter(match="kvtier:v1:*", count=1000)}

    def read(self, name: str) -> bytes:
        value = self.client.get(name)
        assert isinstance(value, bytes)
        return value

    def write(self, name: str, value: bytes) -> None:
        self.client.set(name, value)

    def record(self, name: str) -> bytes:
        value = self.client.get("kvtier:record:" + name)
        assert isinstance(value, bytes)
        return value


def chunk_key(name: str) -> ChunkKey:
    return ChunkKey(bytes.fromhex(re.findall(r"[0-9a-f]{32}", name)[-1]))


def write_tenants(tmp_path: Path) -> None:
    """A tenants file with one tenant, its API key in tenant.key."""
    key = new_key()
    (tmp_path / "tenant.key").write_text(key + "\n")
    (tmp_path / "salts.secret").write_text(new_secret() + "\n")
    (tmp_path / "tenants.yaml").write_text(
        f"secret_file: salts.secret\ntenants:\n  - name: {TENANT}\n    keys: [{hash_key(key)}]\n"
    )


def serve(tmp_path: Path, log: str, options: list[str], env: dict[str, str]) -> Server:
    port = free_port()
    command = kvtier_serve_command(port, "--dram", "256MiB", *options, "--max-model-len", "4096")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **env}
    return Server([*command, "--dtype", "float32"], port, tmp_path / log, env=env)


def settled(medium: Medium) -> set[str]:
    """The stored chunks once their number stops growing (the writes behind the answers)."""
    last: set[str] = set()
    still, deadline = 0, time.monotonic() + 60
    while still < 4 and time.monotonic() < deadline:
        now = medium.names()
        still = still + 1 if now == last else 0
        last = now
        time.sleep(0.25)
    return last


def first_answers(server: Server, key: str, medium: Medium) -> tuple[list[str], list[set[str]]]:
    """Each prompt's answer from a cold server, and the chunks each one stored."""
    texts, stored = [], []
    for prompt in PROMPTS:
        before = settled(medium)
        done = server.complete(prompt, max_tokens=8, api_key=key)
        assert done.cached_tokens == 0
        texts.append(done.text)
        stored.append(settled(medium) - before)
    assert all(len(s) >= 2 for s in stored), stored
    return texts, stored


def answers(server: Server, key: str) -> list[tuple[str, int]]:
    out = []
    for prompt in PROMPTS:
        done = server.complete(prompt, max_tokens=8, api_key=key)
        assert done.prompt_tokens > 512 and done.cached_tokens is not None
        out.append((done.text, done.cached_tokens))
    return out


def assert_sealed(medium: Medium, sealer: Sealer) -> None:
    """Every stored value is sealed; one opened with the master key is real KV (so the search
    below looks for real bytes), and none of its bytes, nor the tenant's name, appear in any
    stored value or name."""
    names = medium.names()
    values = {name: medium.read(name) for name in names}
    assert values and all(v[:4] == codec.SEALED_MAGIC for v in values.values())
    name = sorted(names)[0]
    tenant = values[name][12:20]  # the clear header's tenant id; its epoch is in the tier
    epoch = medium.record(keyring_record(tenant))[-16:]
    assert sealer.open(chunk_key(name), values[name]) is None  # the epoch is needed
    plain = sealer.open(chunk_key(name), values[name], epoch)
    assert plain is not None
    payload = bytes(codec.decode(plain, expected_key=chunk_key(name)).chunk.data)
    windows = [payload[i : i + 64] for i in (4096, len(payload) // 2, len(payload) - 8192)]
    everything = b"".join(values.values()) + "".join(names).encode()
    assert not any(w in everything for w in windows)
    assert TENANT.encode() not in everything


def tamper(medium: Medium, stored: list[set[str]]) -> None:
    for name in stored[0]:  # a flipped byte
        value = bytearray(medium.read(name))
        value[len(value) // 2] ^= 0x01
        medium.write(name, bytes(value))
    for name in stored[1]:  # truncated
        medium.write(name, medium.read(name)[:-1000])
    # Prompts 2 and 3: each chunk swapped with one of the same length under the other's key.
    left = {name: medium.read(name) for name in stored[2]}
    right = {name: medium.read(name) for name in stored[3]}
    swapped = 0
    for a, va in left.items():
        b = next((b for b, vb in right.items() if len(vb) == len(va)), None)
        if b is not None:
            medium.write(a, right.pop(b))
            medium.write(b, va)
            swapped += 1
    assert swapped >= 2  # both whole chunks of each, the first included


def request_accounts(server: Server, count: int = len(PROMPTS)) -> list[dict[str, Any]]:
    """kvtier's account of each request the server answered, in order (its log lines)."""
    deadline = time.monotonic() + 20
    while True:
        found = re.findall(r"kvtier request (\{.*\})", server.tail(1 << 22))
        if len(found) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in found]
        time.sleep(0.5)


def corruptions(server: Server, tier: str) -> float:
    """The tier's corruption count on the engine's /metrics, once it has come in."""
    series = re.compile(
        rf'^kvtier:tier_corruptions_total\{{[^}}]*tier="{tier}"[^}}]*\}} (\S+)$', re.M
    )
    total, deadline = 0.0, time.monotonic() + 20
    while time.monotonic() < deadline:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        total = sum(float(m.group(1)) for m in series.finditer(text))
        if total >= 4:
            break
        time.sleep(0.5)
    return total


def check_tier(
    tmp_path: Path,
    tier: str,
    medium: Medium,
    keys: str,
    options: list[str],
    env: dict[str, str],
) -> Iterator[str]:
    """The whole story on one tier (its chunks sealed with master key ``keys``, the tenant's
    API key in ``tmp_path``); yields each server's log."""
    key = (tmp_path / "tenant.key").read_text().strip()
    sealer = Sealer(MasterKeys.parse(keys, "the test's key"))
    with serve(tmp_path, f"{tier}-1.log", options, env) as server:
        cold, stored = first_answers(server, key, medium)
    assert_sealed(medium, sealer)
    with serve(tmp_path, f"{tier}-2.log", options, env) as server:  # a restart: DRAM is empty
        assert all(cached > 500 for _, cached in answers(server, key))
    tamper(medium, stored)
    with serve(tmp_path, f"{tier}-3.log", options, env) as server:
        got = answers(server, key)
        assert [text for text, _ in got] == cold  # what the cold server answered
        # vLLM's usage still counts the tokens it planned to load as cached after the load
        # failed and it recomputed them: kvtier's own account of each request says what was
        # loaded and recomputed.
        accounts = request_accounts(server)
        assert len(accounts) == len(PROMPTS)
        for account in accounts[:UNTOUCHED]:
            assert not account["loaded_tokens"], account
            assert account["recomputed_tokens"] == account["prompt_tokens"], account
        untouched = accounts[UNTOUCHED]  # still hits from the tier: caching is on
        assert sum(untouched["loaded_tokens"].values()) > 500 and got[UNTOUCHED][1] > 500
        assert corruptions(server, tier) >= 4
    for n in (1, 2, 3):
        yield (tmp_path / f"{tier}-{n}.log").read_text()


def readme_options(tmp_path: Path) -> list[str]:
    """The README's encryption commands: the key file made as written (in ``tmp_path``), and
    the options of its `kvtier serve` line, with the files it names found there."""
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    make, serve_line = next(b for b in blocks if "kvtier tenants master-key" in b).splitlines()
    kvtier = shlex.quote(str(Path(sys.executable).parent / "kvtier"))
    made = make.replace("kvtier ", f"{kvtier} ", 1)
    subprocess.run(["bash", "-c", made], cwd=tmp_path, check=True, timeout=60)
    words = shlex.split(serve_line)
    assert words[:2] == ["kvtier", "serve"] and "--master-key-file" in words
    return [str(tmp_path / w) if (tmp_path / w).is_file() else w for w in words[2:]]


def test_disk_chunks_are_sealed_and_tampered_ones_are_counted_misses(tmp_path: Path) -> None:
    """The README's commands, and the disk tier."""
    write_tenants(tmp_path)
    options = readme_options(tmp_path)
    master = Path(options[options.index("--master-key-file") + 1])
    assert master.stat().st_mode & 0o077 == 0  # the owner's alone
    key = master.read_text().split("\n", 1)[1].strip()  # under its comment line
    chunks = tmp_path / "chunks"
    options = ["--disk", str(chunks), *options]
    for log in check_tier(tmp_path, "disk", DiskMedium(chunks), key, options, {}):
        assert key not in log


def test_redis_chunks_are_sealed_and_tampered_ones_are_counted_misses(tmp_path: Path) -> None:
    """The master key from the environment (KVTIER_MASTER_KEY), the Redis tier alone."""
    key = new_master_key()
    with RedisServer() as server:
        write_tenants(tmp_path)
        tenants = str(tmp_path / "tenants.yaml")
        options = ["--disk", "none", "--redis", server.url, "--tenants", tenants]
        env = {"KVTIER_MASTER_KEY": key}
        medium = RedisMedium(server.url)
        for log in check_tier(tmp_path, "redis", medium, key, options, env):
            assert key not in log


def test_a_forgotten_tenant_is_never_served_again_on_any_tier(tmp_path: Path) -> None:
    """Two tenants' prompts in a server's disk tier and a real redis-server, sealed. `kvtier
    tenants forget` (the command, servers stopped) deletes acme's epoch and chunks in both;
    after a restart acme's prompt loads nothing from either (recomputed, the same answer)
    while globex's still loads: caching is on. No chunk naming acme is left, and none that
    was copied before opens again."""
    keys = {}
    for tenant in ("acme", "globex"):
        keys[tenant] = new_key()
    (tmp_path / "salts.secret").write_text(new_secret() + "\n")
    (tmp_path / "tenants.yaml").write_text(
        "secret_file: salts.secret\ntenants:\n"
        + "".join(f"  - name: {t}\n    keys: [{hash_key(k)}]\n" for t, k in keys.items())
    )
    master = tmp_path / "master.key"
    master.write_text(new_master_key() + "\n")
    chunks = tmp_path / "chunks"
    prompts = {t: " ".join(f"{t} memo {i}: keep it safe." for i in range(90)) for t in keys}
    with RedisServer() as redis_server:
        options = [
            *("--disk", str(chunks), "--redis", redis_server.url),
            *("--tenants", str(tmp_path / "tenants.yaml"), "--master-key-file", str(master)),
        ]
        disk, shared = DiskMedium(chunks), RedisMedium(redis_server.url)
        with serve(tmp_path, "before.log", options, {}) as server:
            cold = {t: server.complete(prompts[t], 8, api_key=keys[t]).text for t in keys}
            settled(disk), settled(shared)
        acme_chunks = {
            name: medium.read(name)
            for medium in (disk, shared)
            for name in medium.names()
            if medium.read(name)[12:20] == bytes.fromhex(_tenant_id(tmp_path, "acme"))
        }
        assert len(acme_chunks) >= 4  # on disk and in Redis
        kvtier = str(Path(sys.executable).parent / "kvtier")
        forget = [kvtier, "tenants", "forget", "acme", "--tenants", "tenants.yaml"]
        forget += ["--disk", str(chunks), "--redis", redis_server.url]
        done = subprocess.run(forget, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("epoch deleted") == 2, done.stdout
        left = {n for m in (disk, shared) for n in m.names()}
        assert not left & set(acme_chunks)  # removed everywhere
        assert left  # globex's are still there
        for name, value in acme_chunks.items():  # put back, as from a backup: still sealed shut
            (disk if name.startswith("/") else shared).write(name, value)
        with serve(tmp_path, "after.log", options, {}) as server:
            again = {t: server.complete(prompts[t], 8, api_key=keys[t]).text for t in keys}
            accounts = request_accounts(server, 2)
    assert again == cold
    acme, globex = accounts  # in the order sent
    assert not acme["loaded_tokens"] and acme["recomputed_tokens"] == acme["prompt_tokens"]
    assert sum(globex["loaded_tokens"].values()) > 500


def _tenant_id(tmp_path: Path, name: str) -> str:
    return tenant_id(name, load_tenants(str(tmp_path / "tenants.yaml")).secret)
