"""Tenants come from the server: the tenants file, API keys as hashes, the derived cache salt,
and the gate in front of vLLM's API server (driven here as the ASGI app it is, in front of a
small app that records what reaches it). Through the real server:
tests/e2e/test_serve_tenants.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest

from kvtier.errors import ConfigError
from kvtier.integrations.tenant_gate import TENANTS_ENV, TenantGate
from kvtier.tenants import (
    ANONYMOUS,
    Unauthorized,
    derive_salt,
    hash_key,
    load_tenants,
    new_key,
    new_secret,
    salt_tenant,
    tenant_id,
)

KEY_A, KEY_B = new_key(), new_key()


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    return path


def _two(tmp_path: Path, anonymous: str = "isolated") -> Path:
    return _file(
        tmp_path,
        f"anonymous: {anonymous}\ntenants:\n"
        f"  - name: acme\n    keys: [{hash_key(KEY_A)}]\n    quota: {{memory: 512MiB}}\n"
        f"  - name: globex\n    keys: [{hash_key(KEY_B)}]\n",
    )


def test_the_salt_is_the_servers_and_no_pair_collides() -> None:
    pairs = [("a", "b:c"), ("a:b", "c"), ("ab", "c"), ("a", "bc"), ("a", None), ("a", "")]
    salts = [derive_salt(t, s) for t, s in pairs]
    assert len(set(salts[:5])) == 5  # length-prefixed: no concatenation collides
    assert salts[4] == salts[5]  # no salt and an empty one are the same (vLLM's view)
    assert all(s.startswith("kvt1-") and len(s) == 5 + 16 + 1 + 64 for s in salts)
    # Every salt of a tenant begins with its id, whatever the client salt: the engine counts
    # a request for its tenant from the salt alone.
    assert {salt_tenant(s) for s in salts[4:]} == {tenant_id("a")}
    assert salt_tenant(salts[0]) == tenant_id("a") != salt_tenant(salts[1])
    assert salt_tenant("victims-salt") is None and salt_tenant(None) is None
    assert "acme" not in derive_salt("acme", "acme-secret-project")
    assert derive_salt("acme", None, b"pod secret") != derive_salt("acme", None)
    assert derive_salt("acme", "x") == derive_salt("acme", "x")  # every process agrees


def test_keys_identify_their_tenant_and_only_theirs(tmp_path: Path) -> None:
    tenants = load_tenants(_two(tmp_path))
    assert tenants.identify(f"Bearer {KEY_A}") == "acme"
    assert tenants.identify(f"bearer  {KEY_B} ") == "globex"
    assert tenants.identify(None) == ANONYMOUS
    assert tenants.names == ["acme", "globex", ANONYMOUS]
    assert tenants.tenants[0].quota == {"memory": 512 << 20}
    for header in (f"Bearer {new_key()}", f"Bearer {hash_key(KEY_A)}", KEY_A, "Bearer ", ""):
        with pytest.raises(Unauthorized) as err:
            tenants.identify(header)
        assert KEY_A not in str(err.value) and "sha256" not in str(err.value)
    refusing = load_tenants(_two(tmp_path, "refuse"))
    with pytest.raises(Unauthorized, match="needs an API key"):
        refusing.identify(None)
    assert refusing.names == ["acme", "globex"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tenants:\n  - name: a\n    keys: [kvt-plaintext]\n", "never the key"),
        ("tenants:\n  - name: anonymous\n    keys: [{h}]\n", "not anonymous, other, unknown"),
        ("tenants:\n  - name: unknown\n    keys: [{h}]\n", "not anonymous, other, unknown"),
        ("tenants:\n  - name: a\n    keys: [{h}]\n  - name: a\n    keys: [{g}]\n", "twice"),
        ("tenants:\n  - name: a\n    keys: [{h}]\n  - name: b\n    keys: [{h}]\n", "share a key"),
        ("anonymous: maybe\n", "'isolated' or 'refuse'"),
        ("tenant: []\n", "unknown keys .*tenant"),
        ("tenants:\n  - name: a\n    keys: [{h}]\n    quota: {{disk: lots}}\n", "quota.disk"),
        ("tenants: [\n", "not valid YAML"),
    ],
)
def test_a_bad_tenants_file_names_its_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = _file(tmp_path, text.format(h=hash_key(KEY_A), g=hash_key(KEY_B)))
    with pytest.raises(ConfigError, match=problem) as err:
        load_tenants(path)
    assert str(path) in str(err.value)


class Recorder:
    """The app behind the gate: records each request's path and JSON body, answers 200."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any], dict[bytes, bytes]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = dict(scope["headers"])
        assert int(headers.get(b"content-length", b"0")) == len(body)
        self.seen.append((scope["path"], json.loads(body) if body else {}, headers))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def _call(gate: TenantGate, path: str, body: Any = None, key: str | None = None) -> int:
    raw = json.dumps(body).encode() if body is not None else b""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    method = "POST" if body is not None else "GET"
    scope: dict[str, Any] = {"type": "http", "method": method, "path": path, "headers": headers}
    parts = [raw[:5], raw[5:]]  # a body in two messages, as a client may send it
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    return int(sent[0]["status"])


def test_the_gate_sets_each_requests_salt_from_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TENANTS_ENV, str(_two(tmp_path)))
    app = Recorder()
    gate = TenantGate(app)
    chat = {"messages": [{"role": "user", "content": "hi"}], "cache_salt": "victims-salt"}
    assert _call(gate, "/v1/chat/completions", chat, KEY_A) == 200
    assert _call(gate, "/v1/chat/completions", chat, KEY_B) == 200  # the attacker's key
    assert _call(gate, "/v1/completions", {"prompt": "hi"}, KEY_A) == 200
    assert _call(gate, "/v1/completions", {"prompt": "hi"}) == 200  # anonymous
    salts = [body["cache_salt"] for _, body, _ in app.seen]
    assert salts == [
        derive_salt("acme", "victims-salt"),
        derive_salt("globex", "victims-salt"),
        derive_salt("acme", None),
        derive_salt(ANONYMOUS, None),
    ]
    assert len(set(salts)) == 4 and app.seen[0][1]["messages"] == chat["messages"]
    # Refused before the app: unknown keys, paths that would run the model unsalted.
    assert _call(gate, "/v1/chat/completions", chat, new_key()) == 401
    assert _call(gate, "/v1/responses", {"input": "hi"}, KEY_A) == 404
    assert _call(gate, "/v1/chat/completions", {"cache_salt": 7}, KEY_A) == 400
    assert _call(gate, "/health") == _call(gate, "/v1/models") == 200  # open
    assert _call(gate, "/tokenize", {"prompt": "hi"}, KEY_A) == 200
    assert len(app.seen) == 4 + 3 and "cache_salt" not in app.seen[-1][1]


def test_a_gate_refusing_anonymous_asks_for_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TENANTS_ENV, str(_two(tmp_path, "refuse")))
    app = Recorder()
    gate = TenantGate(app)
    assert _call(gate, "/v1/completions", {"prompt": "hi"}) == 401
    assert _call(gate, "/v1/completions", {"prompt": "hi"}, KEY_B) == 200
    assert [body["cache_salt"] for _, body, _ in app.seen] == [derive_salt("globex", None)]


def test_without_a_tenants_file_the_gate_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TENANTS_ENV, raising=False)
    app = Recorder()
    assert _call(TenantGate(app), "/v1/completions", {"prompt": "hi", "cache_salt": "s"}) == 200
    assert app.seen[0][1] == {"prompt": "hi", "cache_salt": "s"}


def test_a_secret_file_keys_every_salt(tmp_path: Path) -> None:
    secret = tmp_path / "tenants.yaml.secret"
    secret.write_text(new_secret() + "\n")
    path = _file(
        tmp_path,
        f"secret_file: {secret.name}\ntenants:\n  - name: acme\n    keys: [{hash_key(KEY_A)}]\n",
    )
    keyed = load_tenants(path)
    assert keyed.unkeyed_warning is None
    assert keyed.salt("acme", "x") == derive_salt("acme", "x", bytes.fromhex(secret.read_text()))
    assert keyed.salt("acme", "x") != derive_salt("acme", "x")  # nobody can compute it without
    assert keyed.salt("acme", 7) == keyed.salt("acme", None)  # not a string: no client salt
    assert keyed.by_id()[salt_tenant(keyed.salt("acme", "x")) or ""] == "acme"
    assert keyed.by_id()[tenant_id(ANONYMOUS, keyed.secret)] == ANONYMOUS
    (tmp_path / "plain").mkdir()
    plain = load_tenants(_two(tmp_path / "plain"))
    assert plain.unkeyed_warning and "public function of its name" in plain.unkeyed_warning
    secret.write_text("not hex\n")
    with pytest.raises(ConfigError, match="expected 64 hex digits"):
        load_tenants(path)
    secret.unlink()
    with pytest.raises(ConfigError, match="cannot read") as err:
        load_tenants(path)
    assert str(secret) in str(err.value)
