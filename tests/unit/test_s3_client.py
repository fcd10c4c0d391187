"""The S3 client's signing and credentials, without a server (tests/integration runs it
against SeaweedFS)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from kvtier.errors import ConfigError
from kvtier.tiers.s3_client import EMPTY_SHA256, S3Client
from kvtier.tiers.s3_credentials import Credentials, load_credentials

# AWS's published example ("Signature Calculations for the Authorization Header: Transferring
# Payload in a Single Chunk", GET Object): its keys, time, request and signature.
AWS_KEYS = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
AWS_SIGNATURE = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"


def test_signature_matches_aws_published_example() -> None:
    client = S3Client("", "examplebucket", "us-east-1", AWS_KEYS)
    client.host = "examplebucket.s3.amazonaws.com"  # the example's (global) endpoint
    when = datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC)
    headers = client._headers("GET", "/test.txt", {}, EMPTY_SHA256, {"Range": "bytes=0-9"}, when)
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
        " SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
        f" Signature={AWS_SIGNATURE}"
    )
    assert "wJalr" not in repr(AWS_KEYS)


def test_hosts_paths_and_default_ports() -> None:
    keys = Credentials("a", "b")
    assert S3Client("https://minio.local:443", "b1x", "us-east-1", keys).host == "minio.local"
    assert S3Client("http://127.0.0.1:8333", "b1x", "us-east-1", keys).host == "127.0.0.1:8333"
    aws = S3Client("", "my-bucket", "eu-west-1", keys)
    assert (aws.host, aws._base) == ("my-bucket.s3.eu-west-1.amazonaws.com", "/")
    dotted = S3Client("", "my.bucket", "eu-west-1", keys)  # path style: TLS names match
    assert (dotted.host, dotted._base) == ("s3.eu-west-1.amazonaws.com", "/my.bucket/")


def test_credentials_from_a_profile_never_quote_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "credentials"
    path.write_text(
        "[kv]\naws_access_key_id = AK\naws_secret_access_key = se%cret\naws_session_token = tok\n\n"
    )
    keys = load_credentials("kv", str(path))
    assert (keys.access_key, keys.secret_key, keys.token) == ("AK", "se%cret", "tok")
    path.write_text("aws_secret_access_key = TOPSECRET\n")  # no section header
    with pytest.raises(ConfigError) as bad:
        load_credentials("kv", str(path))
    assert "TOPSECRET" not in str(bad.value) and "not an INI" in str(bad.value)
    path.write_text("[kv]\naws_access_key_id = AK\n")
    with pytest.raises(ConfigError, match="no profile 'other'"):
        load_credentials("other", str(path))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENVSECRET\n")  # as mounted from a file
    keys = load_credentials()
    assert (keys.access_key, keys.secret_key) == ("ENVKEY", "ENVSECRET")
