"""Owners: which tenant each stored chunk belongs to, for the tiers that divide their room
among tenants (:class:`kvtier.policy.quota.QuotaPolicy`) and for encryption at rest.

A chunk's stored form names its namespace (:mod:`kvtier.codec`'s header, bytes 24-32), not
its tenant: the store notes each namespace's tenant as it computes the namespace's keys, from
the tenant id a derived salt begins with (:func:`kvtier.keys.salt_tenant`). A sealed chunk
names its tenant in its clear header (bytes 12-20, :mod:`kvtier.sealing`), so it needs no
note, and opening one notes its namespace's tenant (a chunk promoted from a sealed tier to
DRAM keeps its owner). A chunk of a namespace never noted (written in clear before a restart)
belongs to :data:`NO_TENANT`, as do all chunks of a server without tenants.
"""

from __future__ import annotations

from kvtier.codec import SEALED_MAGIC

NO_TENANT = bytes(8)  # the owner of chunks without a tenant (or whose tenant is not known)
_SEALED_TENANT = slice(12, 20)
_NAMESPACE = slice(24, 32)


def namespace_bytes(namespace_id: str) -> bytes:
    """A namespace id (hex) as the 8 bytes a chunk header holds."""
    return (bytes.fromhex(namespace_id) if namespace_id else b"").ljust(8, b"\0")[:8]


class Owners:
    """Each namespace's tenant (8-byte ids), as the store learns them. Thread-safe: a dict
    whose entries are set once per namespace and read without a lock."""

    def __init__(self) -> None:
        self._tenants: dict[bytes, bytes] = {}  # namespace id -> tenant id

    def note(self, namespace_id: str, tenant_id: str | None) -> None:
        """Chunks of namespace ``namespace_id`` (hex) belong to ``tenant_id`` (16 hex digits;
        None: the server has no tenants)."""
        namespace = namespace_bytes(namespace_id)
        if namespace not in self._tenants:
            self._tenants[namespace] = bytes.fromhex(tenant_id) if tenant_id else NO_TENANT

    def note_bytes(self, namespace: bytes, tenant: bytes) -> None:
        """:meth:`note`, with both ids as the 8 bytes of a header."""
        self._tenants.setdefault(namespace, tenant)

    def of_namespace(self, namespace: bytes) -> bytes:
        """The tenant of a namespace (8 bytes of a header)."""
        return self._tenants.get(namespace, NO_TENANT)

    def of(self, blob: bytes | bytearray | memoryview) -> bytes:
        """The tenant of a stored chunk, sealed or not (:data:`NO_TENANT` if unknown)."""
        view = memoryview(blob).cast("B")
        if view.nbytes >= 32 and bytes(view[:4]) == SEALED_MAGIC:
            return bytes(view[_SEALED_TENANT])
        if view.nbytes >= 32:
            return self.of_namespace(bytes(view[_NAMESPACE]))
        return NO_TENANT
