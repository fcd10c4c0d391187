"""Encryption at rest (kvtier.sealing): sealed chunks open only under their key, namespace,
tenant and master key; rotation; where keys come from; tampering in a store is a miss."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from kvtier import codec
from kvtier.codec import KVChunk
from kvtier.config import StoreConfig, load_config
from kvtier.errors import ConfigError, CorruptChunk
from kvtier.keys import ChunkKey, Namespace
from kvtier.sealing import HEAD_BYTES, MasterKeys, Sealer, new_master_key, plain_bytes
from kvtier.store import TieredStore
from kvtier.tenants import derive_salt, salt_tenant
from kvtier.tiers import DiskTier, MemoryTier
from kvtier.tiers.inspect import inspect
from kvtier.tiers.sealed import Forgotten, SealedTier

KEY_A, KEY_B = ChunkKey(bytes(range(16))), ChunkKey(bytes(range(1, 17)))


def chunk_blob(key: ChunkKey, namespace_id: str = "00" * 8, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).standard_normal((2, 2, 16, 2, 8), dtype=np.float32)
    return codec.encode(key, KVChunk.from_array(data), namespace_id)


def sealer(*keys: str) -> Sealer:
    return Sealer(MasterKeys.parse("\n".join(keys or (new_master_key(),)), "test"))


def test_a_sealed_chunk_opens_to_the_same_bytes_and_holds_no_plaintext() -> None:
    s = sealer()
    plain = chunk_blob(KEY_A)
    sealed = s.seal(KEY_A, plain)
    assert plain_bytes(sealed) == len(plain) and len(sealed) == len(plain) + 56
    assert plain[200:264] not in sealed  # no stretch of the KV payload survives
    opened = s.open(KEY_A, sealed)
    assert opened is not None and bytes(opened) == plain
    twice = s.seal(KEY_A, plain)
    assert twice[HEAD_BYTES:] != sealed[HEAD_BYTES:]  # a fresh nonce each time


@pytest.mark.parametrize(
    "tamper",
    ["flip a payload byte", "flip the tag", "truncate", "another key", "header's tenant"],
)
def test_tampering_fails_authentication(tamper: str) -> None:
    s = sealer()
    sealed = s.seal(KEY_A, chunk_blob(KEY_A))
    key = KEY_A
    if tamper == "flip a payload byte":
        sealed[HEAD_BYTES + 500] ^= 1
    elif tamper == "flip the tag":
        sealed[-1] ^= 0x80
    elif tamper == "truncate":
        sealed = sealed[:-100]
    elif tamper == "another key":  # the same bytes stored under another chunk's key
        key = KEY_B
    else:  # another tenant's id in the clear header: another data key, and the AAD changed
        struct.pack_into("<8s", sealed, 12, b"\x01" * 8)
    assert s.open(key, sealed) is None


def test_tenants_have_their_own_data_keys_and_other_master_keys_open_nothing() -> None:
    s = sealer()
    ns_a, ns_b = "aa" * 8, "bb" * 8
    s.note(ns_a, salt_tenant(derive_salt("acme", None, b"secret")))
    s.note(ns_b, salt_tenant(derive_salt("globex", None, b"secret")))
    sealed_a = s.seal(KEY_A, chunk_blob(KEY_A, ns_a))
    sealed_b = s.seal(KEY_A, chunk_blob(KEY_A, ns_b))
    assert sealed_a[12:20] != sealed_b[12:20] and sealed_a[12:20] != bytes(8)
    # Tenant A's header over tenant B's ciphertext (same chunk key): does not open.
    forged = bytearray(sealed_a[:HEAD_BYTES]) + sealed_b[HEAD_BYTES:]
    assert s.open(KEY_A, forged) is None
    assert s.open(KEY_A, sealed_a) is not None and s.open(KEY_A, sealed_b) is not None
    assert sealer().open(KEY_A, sealed_a) is None  # another server's master key


def test_rotation_seals_with_the_first_key_and_opens_with_any() -> None:
    old, new = new_master_key(), new_master_key()
    sealed_old = sealer(old).seal(KEY_A, chunk_blob(KEY_A))
    rotated = sealer(new, old)
    assert rotated.open(KEY_A, sealed_old) is not None
    sealed_new = rotated.seal(KEY_A, chunk_blob(KEY_A))
    assert sealer(old).open(KEY_A, sealed_new) is None  # the old key alone: a clean miss
    assert sealer(new).open(KEY_A, sealed_new) is not None
    assert sealer(new).open(KEY_A, sealed_old) is None  # old key retired


def test_key_files_and_variables_and_their_errors_never_show_a_key(tmp_path: Path) -> None:
    key = new_master_key()
    path = tmp_path / "master.key"
    path.write_text(f"# kvtier master keys\n{key}\n")
    assert MasterKeys.load(str(path)) is not None
    loaded = MasterKeys.load(env_var="K", env={"K": key})
    assert loaded is not None and loaded.keys == (bytes.fromhex(key),)
    assert MasterKeys.load() is None  # no encryption
    bad = "zz" + key[2:]
    path.write_text(bad + "\n")
    with pytest.raises(ConfigError) as error:
        MasterKeys.load(str(path))
    assert "line 1" in str(error.value) and bad not in str(error.value)
    with pytest.raises(ConfigError, match="not set"):
        MasterKeys.load(env_var="K", env={})
    with pytest.raises(ConfigError, match="give one"):
        StoreConfig(master_key_file=str(path), master_key_env="K")
    # KVTIER_MASTER_KEY in the environment turns encryption on (and is no unknown variable).
    config = load_config(env={"KVTIER_MASTER_KEY": key})
    assert config.master_key_env == "KVTIER_MASTER_KEY" and key not in repr(config)


def test_a_tampered_chunk_in_a_sealed_disk_tier_is_a_counted_miss(tmp_path: Path) -> None:
    """Through the store: a chunk flipped on disk, and one swapped with another's file,
    are misses counted as corruptions; the untouched chunk still reads."""
    s = sealer()
    disk = SealedTier(DiskTier(tmp_path / "disk", 1 << 30, fsync=False), s)
    store = TieredStore([MemoryTier(1 << 30), disk], chunk_tokens=16, owners=s.owners)
    ns = Namespace("m", kv_dtype="float32", tenant_salt=derive_salt("acme", None, b"x"))
    tokens = list(range(48))
    data = np.random.default_rng(1).standard_normal((2, 2, 16, 2, 8), dtype=np.float32)
    chunks = [KVChunk.from_array(data + i) for i in range(3)]
    store.put(tokens, ns, chunks)
    assert store.flush(10)
    keys = store.keys(tokens, ns)
    files = {key: next((tmp_path / "disk").rglob(key.hex() + "*")) for key in keys}
    stored = files[keys[0]].read_bytes()
    assert stored[:4] == b"KVTE" and bytes(chunks[0].data)[:64] not in stored
    flipped = bytearray(stored)
    flipped[len(flipped) // 2] ^= 1
    files[keys[0]].write_bytes(flipped)
    second, third = files[keys[1]].read_bytes(), files[keys[2]].read_bytes()
    files[keys[1]].write_bytes(third)  # the same length, another key's chunk
    files[keys[2]].write_bytes(second)
    store.close()
    reopened = SealedTier(DiskTier(tmp_path / "disk", 1 << 30, fsync=False), s)
    below = TieredStore([MemoryTier(1 << 30), reopened], chunk_tokens=16, owners=s.owners)
    got = below.get(tokens, ns)
    assert got.tokens == 0  # the first chunk failed: nothing leads
    assert below.stats().tiers[reopened.name].corruptions >= 1
    with pytest.raises(CorruptChunk, match="sealed chunk"):
        codec.decode(flipped)
    below.close()


def test_forgetting_a_tenant_shreds_its_chunks_in_every_copy(tmp_path: Path) -> None:
    """Two engines share a disk directory. Forgetting acme deletes its epoch: none of its
    chunks opens any more, neither in the tier nor from a copy taken before (even with the
    master key), and they are removed; globex's chunks still read, and acme's next chunk
    starts a new epoch that both engines agree on."""
    keys = MasterKeys.parse(new_master_key(), "test")
    engines = [Sealer(keys), Sealer(keys)]
    acme_ns, globex_ns = "aa" * 8, "bb" * 8
    for s in engines:
        s.note(acme_ns, salt_tenant(derive_salt("acme", None, b"k")))
        s.note(globex_ns, salt_tenant(derive_salt("globex", None, b"k")))
    first, second = (SealedTier(DiskTier(tmp_path, 1 << 30, fsync=False), s) for s in engines)
    first.put_many([(KEY_A, chunk_blob(KEY_A, acme_ns)), (KEY_B, chunk_blob(KEY_B, globex_ns))])
    assert codec.decode(bytes(second.get_many([KEY_A])[0] or b"")).header.key == KEY_A
    acme = bytes.fromhex(salt_tenant(derive_salt("acme", None, b"k")) or "")
    copy = (tmp_path / KEY_A.hex()[:2] / (KEY_A.hex() + ".kvc")).read_bytes()
    assert first.forget(acme) == Forgotten(True, 1)
    second.keyring.ttl_s = 0  # the other engine trusts what it read for KEYRING_TTL_S
    assert second.get_many([KEY_A]) == [None]  # removed
    (tmp_path / KEY_A.hex()[:2] / (KEY_A.hex() + ".kvc")).write_bytes(copy)  # restored
    restored = second.get_many([KEY_A])[0]
    assert restored is not None and bytes(restored[:4]) == b"KVTE"  # does not open
    assert Sealer(keys).open(KEY_A, copy, b"") is None  # nor with the master key alone
    assert codec.decode(bytes(second.get_many([KEY_B])[0] or b"")).header.key == KEY_B
    second.put_many([(KEY_A, chunk_blob(KEY_A, acme_ns))])  # a new epoch
    first.keyring.ttl_s = 0
    assert codec.decode(bytes(first.get_many([KEY_A])[0] or b"")).header.key == KEY_A
    with pytest.raises(ValueError, match="no tenant"):
        first.forget(bytes(8))


def test_inspect_counts_sealed_chunks_and_opens_them_only_with_the_key(tmp_path: Path) -> None:
    s = sealer()
    SealedTier(DiskTier(tmp_path, 1 << 30, fsync=False), s).put_many(
        [(KEY_A, chunk_blob(KEY_A)), (KEY_B, chunk_blob(KEY_B))]
    )
    raw = DiskTier(tmp_path, 1 << 30, read_only=True)
    blind = inspect(raw, "disk", str(tmp_path), verify=True, repair=False)
    assert blind.sealed == 2 and not blind.bad and not blind.opened  # never bad without a key
    opened = inspect(raw, "disk", str(tmp_path), verify=True, repair=False, sealer=s)
    assert opened.sealed == 2 and not opened.bad and opened.opened
    path = tmp_path / KEY_B.hex()[:2] / (KEY_B.hex() + ".kvc")
    flipped = bytearray(path.read_bytes())
    flipped[-5] ^= 1
    path.write_bytes(flipped)
    checked = inspect(raw, "disk", str(tmp_path), verify=True, repair=False, sealer=s)
    assert [b["key"] for b in checked.bad] == [KEY_B.hex()]
    assert "does not open" in checked.bad[0]["problem"]


def test_a_read_into_the_callers_buffers_decrypts_in_place_and_catches_tampering() -> None:
    inner = MemoryTier(1 << 30)
    tier = SealedTier(inner, sealer())
    plain = [chunk_blob(KEY_A, seed=1), chunk_blob(KEY_B, seed=2)]
    tier.put_many([(KEY_A, plain[0]), (KEY_B, plain[1])])
    bufs = [(bytearray(codec.HEADER_BYTES), bytearray(len(p) - codec.HEADER_BYTES)) for p in plain]
    keys = (KEY_A, KEY_B)
    items = [(k, [memoryview(h), memoryview(b)]) for k, (h, b) in zip(keys, bufs, strict=True)]
    assert tier.read_into_many(items) == [len(plain[0]), len(plain[1])]
    assert [bytes(h) + bytes(b) for h, b in bufs] == plain
    sealed = bytearray(inner.get_many([KEY_B])[0] or b"")
    sealed[HEAD_BYTES + 4000] ^= 0x10
    inner.put_many([(KEY_B, bytes(sealed))])
    assert tier.read_into_many(items)[1] == -1  # read whole next: a counted corruption
    short = [(KEY_A, [memoryview(bytearray(10))])]
    assert tier.read_into_many(short) == [len(plain[0])]  # another size: read it whole
