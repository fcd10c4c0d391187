"""Encryption at rest: chunks sealed with AES-256-GCM, bound to their key, namespace and tenant.

A sealed chunk is the stored form of :mod:`kvtier.codec` (header and payload), encrypted as a
whole, behind a 40-byte header of its own (little-endian)::

    0  magic "KVTE"      4  version u16        6  zero u16
    8  master key id (4 bytes)                 12 tenant id (8 bytes; zero: no tenant)
    20 namespace id (8 bytes)                  28 nonce (12 bytes, random)
    40 ciphertext (as long as the plain stored form), then the GCM tag (16 bytes)

The associated data is that header and the chunk key the reader asked for, so a chunk moved
to another key, given another tenant's or namespace's header, truncated or flipped fails
authentication (and is a miss, counted as a corruption, never served). The data key of each
tenant is HKDF-SHA256 of a master key with the tenant id and the tenant's epoch as its info:
one tenant's key opens no other tenant's chunks. The epoch is 16 random bytes each tier keeps
per tenant (:class:`kvtier.tiers.sealed.Keyring`); forgetting a tenant deletes it, and every
chunk sealed under it becomes unreadable at once, even to whoever holds the master key and a
copy of the chunks (crypto-shredding). Master keys come from a key file (one 64-hex-digit
key per line, the first one seals, the others still open what they sealed: rotation) or an
environment variable, never from a command line; the id in each header names which master
key sealed it (the first 4 bytes of a hash of the key, which reveals nothing of it).

What it protects: chunks on disk, in Redis and in any tier added later, from whoever reads
the medium or the wire without the master key (a stolen disk, a Redis dump, another tenant
with access to the shared tier). Not protected: chunks in this process's memory (DRAM tier;
``encrypt_dram`` seals those too), and the engine itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kvtier.codec import SEALED_MAGIC as MAGIC
from kvtier.config import MASTER_KEY_VAR as MASTER_KEY_VAR
from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey
from kvtier.owners import NO_TENANT as NO_TENANT
from kvtier.owners import Owners

log = logging.getLogger("kvtier")

VERSION = 1
_HEAD = struct.Struct("<4sHH4s8s8s12s")
HEAD_BYTES = _HEAD.size
TAG_BYTES = 16
OVERHEAD = HEAD_BYTES + TAG_BYTES
_KDF_SALT = b"kvtier at-rest data key v1"
_KEY_LINE = re.compile(r"[0-9a-fA-F]{64}")
assert HEAD_BYTES == 40
_BLOCK = 256 * 1024  # in-place decryption's scratch: stays in L2 between decrypt and copy


@dataclass(frozen=True)
class _Opening:
    decryptor: Any  # cryptography's AEADDecryptionContext
    namespace: bytes
    tenant: bytes


def key_id(master: bytes) -> bytes:
    """The 4-byte id of a master key in sealed headers (a hash: it reveals nothing)."""
    return hashlib.sha256(b"kvtier master key id\0" + master).digest()[:4]


@dataclass(frozen=True)
class MasterKeys:
    """The master keys a server holds: ``keys[0]`` seals, every one opens what it sealed."""

    keys: tuple[bytes, ...]
    source: str  # where they came from, for messages (never the keys)

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) != 32 for k in self.keys):
            raise ConfigError(f"{self.source}: a master key is 32 bytes (64 hex digits)")

    @classmethod
    def parse(cls, text: str, source: str) -> MasterKeys:
        """Keys from a key file's text (or a variable's value): one 64-hex-digit key per
        line, ``#`` comments and blank lines ignored. Errors never repeat a key."""
        keys = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if not _KEY_LINE.fullmatch(line):
                raise ConfigError(
                    f"{source}: line {number} is not a master key (64 hex digits:"
                    " `kvtier tenants master-key FILE` writes one)"
                )
            keys.append(bytes.fromhex(line))
        if not keys:
            raise ConfigError(f"{source}: no master key in it")
        return cls(tuple(keys), source)

    @classmethod
    def load(
        cls, key_file: str = "", env_var: str = "", env: Mapping[str, str] | None = None
    ) -> MasterKeys | None:
        """The keys a store's config names (None: no encryption): a file, or a variable."""
        if key_file and env_var:
            raise ConfigError("master_key_file and master_key_env: give one of them")
        if key_file:
            try:
                with open(key_file, encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                raise ConfigError(
                    f"master_key_file: cannot read {key_file}: {exc.strerror}"
                ) from None
            return cls.parse(text, f"master key file {key_file}")
        if env_var:
            value = (os.environ if env is None else env).get(env_var)
            if not value:
                raise ConfigError(f"master_key_env: the variable {env_var} is not set")
            return cls.parse(value.replace(",", "\n"), f"the variable {env_var}")
        return None


def new_master_key() -> str:
    """A fresh master key, as a key file holds it."""
    return os.urandom(32).hex()


class Sealer:
    """Seals and opens chunks with the master keys' per-tenant data keys. Thread-safe.

    It learns which tenant each namespace belongs to from the store's writes (and from the
    chunks it opens, so a chunk promoted from one sealed tier to another keeps its tenant).
    """

    def __init__(self, keys: MasterKeys, owners: Owners | None = None):
        self.keys = keys
        self._by_id = {key_id(k): k for k in keys.keys}
        self._sealing_id = key_id(keys.keys[0])
        self._data_keys: dict[tuple[bytes, bytes], bytes] = {}
        self.owners = owners or Owners()  # each namespace's tenant
        self._lock = threading.Lock()

    def note(self, namespace_id: str, tenant_id: str | None) -> None:
        """Chunks of namespace ``namespace_id`` (hex) belong to ``tenant_id`` (16 hex digits;
        None: the server has no tenants)."""
        self.owners.note(namespace_id, tenant_id)

    def _data_key(self, master_id: bytes, tenant: bytes, epoch: bytes) -> bytes | None:
        got = self._data_keys.get((master_id, tenant + epoch))
        if got is None:
            master = self._by_id.get(master_id)
            if master is None:
                return None
            kdf = HKDF(hashes.SHA256(), 32, _KDF_SALT, b"kvtier tenant " + tenant + epoch)
            got = kdf.derive(master)
            with self._lock:
                self._data_keys[(master_id, tenant + epoch)] = got
        return got

    def tenant_of(self, blob: bytes | bytearray | memoryview) -> bytes:
        """The tenant (8 bytes; zero: none) whose key seals the stored chunk ``blob``."""
        return self.owners.of(blob)

    def seal(
        self, key: ChunkKey, blob: bytes | bytearray | memoryview, epoch: bytes = b""
    ) -> bytearray:
        """The sealed form of the stored chunk ``blob`` under ``key``, with its tenant's
        ``epoch`` (:meth:`tenant_of` says which tenant)."""
        plain = memoryview(blob).cast("B")
        namespace = bytes(plain[24:32]) if plain.nbytes >= 32 else bytes(8)
        tenant = self.owners.of_namespace(namespace)
        nonce = os.urandom(12)
        head = _HEAD.pack(MAGIC, VERSION, 0, self._sealing_id, tenant, namespace, nonce)
        data_key = self._data_key(self._sealing_id, tenant, epoch)
        assert data_key is not None
        encryptor = Cipher(algorithms.AES(data_key), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(head + key)
        out = bytearray(HEAD_BYTES + plain.nbytes + TAG_BYTES)
        view = memoryview(out)
        view[:HEAD_BYTES] = head
        encryptor.update_into(plain, view[HEAD_BYTES : HEAD_BYTES + plain.nbytes])
        encryptor.finalize()
        view[HEAD_BYTES + plain.nbytes :] = encryptor.tag
        return out

    def open_into(
        self,
        key: ChunkKey,
        sealed: bytes | bytearray | memoryview,
        buffers: Sequence[memoryview],
        epoch: bytes = b"",
    ) -> bool:
        """Decrypt ``sealed`` (stored under ``key``) into ``buffers`` in order (their sizes
        must add up to the plain form's: :func:`plain_bytes`), with the epoch of its tenant
        (:func:`sealed_tenant` says which); False if it fails to authenticate, and then the
        buffers hold garbage."""
        view = memoryview(sealed).cast("B")
        size = plain_bytes(view)
        if size is None or size != sum(b.nbytes for b in buffers):
            return False
        opening = self._decryptor(key, view[:HEAD_BYTES], view[HEAD_BYTES + size :], epoch)
        if opening is None:
            return False
        offset = HEAD_BYTES
        for buf in buffers:
            opening.decryptor.update_into(view[offset : offset + buf.nbytes], buf)
            offset += buf.nbytes
        return self._finish(opening)

    def open_in_place(
        self,
        key: ChunkKey,
        head: bytes | bytearray | memoryview,
        buffers: Sequence[memoryview],
        tag: bytes | bytearray | memoryview,
        epoch: bytes = b"",
    ) -> bool:
        """Decrypt a sealed chunk read in pieces (its header, its ciphertext into
        ``buffers``, its tag) where it lies: what a tier read straight into the caller's
        buffers. The cipher cannot write over its own input, so each block goes through a
        scratch buffer small enough to stay in cache. False if it fails to authenticate."""
        opening = self._decryptor(key, memoryview(head).cast("B"), tag, epoch)
        if opening is None:
            return False
        scratch = memoryview(bytearray(_BLOCK))
        for buf in buffers:
            for start in range(0, buf.nbytes, _BLOCK):
                block = buf[start : start + _BLOCK]
                done = opening.decryptor.update_into(block, scratch)
                block[:] = scratch[:done]
        return self._finish(opening)

    def _decryptor(
        self, key: ChunkKey, head: memoryview, tag: bytes | bytearray | memoryview, epoch: bytes
    ) -> _Opening | None:
        """A decryptor for the sealed chunk whose clear header is ``head`` (None: not a
        sealed header of this version, or a master key this server does not hold)."""
        if head.nbytes != HEAD_BYTES or bytes(head[:4]) != MAGIC:
            return None
        _, version, _, master_id, tenant, namespace, nonce = _HEAD.unpack_from(head)
        data_key = self._data_key(master_id, tenant, epoch)
        if version != VERSION or data_key is None:
            return None
        decryptor = Cipher(algorithms.AES(data_key), modes.GCM(nonce, bytes(tag))).decryptor()
        decryptor.authenticate_additional_data(bytes(head) + key)
        return _Opening(decryptor, namespace, tenant)

    def _finish(self, opening: _Opening) -> bool:
        """Whether the tag authenticated what was decrypted; then the chunk's namespace keeps
        its tenant here (a chunk promoted to another sealed tier is sealed for it)."""
        try:
            opening.decryptor.finalize()
        except InvalidTag:
            return False
        self.owners.note_bytes(opening.namespace, opening.tenant)
        return True

    def open(
        self, key: ChunkKey, sealed: bytes | bytearray | memoryview, epoch: bytes = b""
    ) -> bytearray | None:
        """The plain stored form of ``sealed``, or None if it fails to authenticate."""
        size = plain_bytes(sealed)
        if size is None:
            return None
        out = bytearray(size)
        return out if self.open_into(key, sealed, [memoryview(out)], epoch) else None


def plain_bytes(sealed: bytes | bytearray | memoryview) -> int | None:
    """The size of a sealed chunk's plain form (None: not a sealed chunk of this version)."""
    view = memoryview(sealed).cast("B")
    if view.nbytes < OVERHEAD or bytes(view[:4]) != MAGIC:
        return None
    if struct.unpack_from("<H", view, 4)[0] != VERSION:
        return None
    return view.nbytes - OVERHEAD


def sealed_tenant(sealed: bytes | bytearray | memoryview) -> bytes | None:
    """The tenant id (8 bytes) in a sealed chunk's clear header (None: not a sealed chunk)."""
    if plain_bytes(sealed) is None:
        return None
    return bytes(memoryview(sealed).cast("B")[12:20])
