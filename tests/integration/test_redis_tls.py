"""`rediss://`: kvtier's Redis tier over TLS, against a real redis-server that speaks TLS only,
with a certificate authority and a server certificate this test makes. The store writes and
reads through it as the ACL user; a client that does not trust the server's certificate (or
speaks plain TCP to it) finds nothing there and recomputes: a miss, not a failure."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvtier import TieredStore
from kvtier.config import RedisTierConfig
from kvtier.redis_process import RedisServer
from kvtier.tiers import MemoryTier, RedisTier

from kvhelpers import CHUNK_TOKENS, NS, SHAPE, chunk, chunks_for, prompt


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_tls(where: Path) -> tuple[str, str, str]:
    """(server certificate, its key, the CA's certificate) files in ``where``."""
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvtier test CA")])
    ca = _certificate("kvtier test CA", ca_key, ca_name, ca_key, ca=True)
    server = _certificate("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    files = (where / "server.pem", where / "server.key", where / "ca.pem")
    files[0].write_bytes(server.public_bytes(pem))
    files[1].write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files[1].chmod(0o600)
    files[2].write_bytes(ca.public_bytes(pem))
    return str(files[0]), str(files[1]), str(files[2])


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    tls = make_tls(tmp_path_factory.mktemp("tls"))
    with RedisServer(acl_user="kvtier", tls=tls) as server:
        yield server
        server.close()


def test_the_store_reads_and_writes_over_tls(tls_server: RedisServer) -> None:
    url = tls_server.url
    assert url.startswith("rediss://127.0.0.1:") and "ssl_ca_certs=" in url
    RedisTierConfig(url=url, username="kvtier", password_file=tls_server.password_file)
    tokens = prompt(41, 3)
    tier = RedisTier(url, username="kvtier", password_file=tls_server.password_file)
    with TieredStore([MemoryTier(1 << 20), tier], CHUNK_TOKENS) as store:
        store.put(tokens, NS, chunks_for(41, 3))
        store.flush()
    fresh = RedisTier(url, username="kvtier", password_file=tls_server.password_file)
    with TieredStore([MemoryTier(1 << 20), fresh], CHUNK_TOKENS) as store:
        dests = [np.zeros(SHAPE, dtype=np.float16) for _ in range(3)]
        assert store.get_into(tokens, NS, dests).tiers == ["redis"] * 3
        assert np.array_equal(dests[2], chunk(41002).numpy())
    # Not trusting the server's certificate (the system's CAs only), or plain TCP: a miss.
    untrusted = url.split("?", 1)[0]
    plain = url.replace("rediss://", "redis://").split("?", 1)[0]
    for other in (untrusted, plain):
        tier = RedisTier(other, username="kvtier", password_file=tls_server.password_file)
        with TieredStore([MemoryTier(1 << 20), tier], CHUNK_TOKENS) as store:
            assert store.lookup(tokens, NS).tiers == []
