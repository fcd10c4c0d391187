"""Tenants through `kvtier pod --tenants FILE`: the router authenticates each request and keys
its prompt with the tenant's salt, as the engines do; the engines authenticate too (one can be
reached on its own port). A tenant's context hits for that tenant through the pod (vLLM's
cache or the shared tier), never for another tenant sending the victim's own `cache_salt`, nor
for a request without a key; unknown keys are refused by the router and by an engine.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kvtier.tenants import hash_key, new_key, new_secret

from browser import chromium_page
from pods import MODEL, get_json, readme_pod, wait_for

pytestmark = pytest.mark.slow
ACME, GLOBEX, INITECH = new_key(), new_key(), new_key()
PROMPT = " ".join(f"Entry {i} of acme's quarterly plan, not for anyone else." for i in range(50))


def ask(base: str, key: str | None, salt: str | None = "plans") -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    if salt:
        body["cache_salt"] = salt
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=300) as r:
        return dict(json.load(r))


def command_lines() -> list[str]:
    """Every process's whole command line (``ps`` cuts them to its width)."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return lines


def cached(reply: dict[str, Any]) -> int:
    usage = reply["usage"]
    assert usage["prompt_tokens"] > 500
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def test_through_a_pod_a_tenants_context_hits_for_it_alone(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    tenants = tmp_path / "tenants.yaml"
    (tmp_path / "salts.secret").write_text(new_secret() + "\n")  # router and engines read it
    tenants.write_text(
        "secret_file: salts.secret\n"
        f"tenants:\n  - name: acme\n    keys: [{hash_key(ACME)}]\n    quota: {{memory: 512MiB}}\n"
        f"  - name: globex\n    keys: [{hash_key(GLOBEX)}]\n"
        f"  - name: initech\n    keys: [{hash_key(INITECH)}]\n"
    )
    with readme_pod(tmp_path_factory, "kvtier pod", "--tenants", str(tenants)) as pod:
        assert cached(ask(pod.url, ACME)) == 0
        assert cached(ask(pod.url, ACME)) > 256  # the same tenant hits: caching is on
        assert cached(ask(pod.url, GLOBEX)) == 0  # the victim's cache_salt, another key
        assert cached(ask(pod.url, None)) == 0  # anonymous
        assert cached(ask(pod.url, None)) > 256  # ... which hits its own
        engine = f"http://127.0.0.1:{pod.engine_port}"
        assert cached(ask(engine, INITECH)) == 0  # on an engine's own port: the same rules
        assert cached(ask(engine, ACME)) > 256
        for base in (pod.url, engine):
            with pytest.raises(urllib.error.HTTPError) as refused:
                ask(base, new_key())
            assert refused.value.code == 401
            assert "unknown API key" in refused.value.read().decode()

        # Quotas: each tenant's part of each engine's DRAM and disk, in /metrics (acme's
        # DRAM quota from the file, an equal share elsewhere) and on the console.
        def parts() -> dict[tuple[str, str, str], float]:
            found: dict[tuple[str, str, str], float] = {}
            series = r'^kvtier:tenant_tier_(\w+)\{[^}]*tenant="(\w+)",tier="(\w+)"[^}]*\} (\S+)$'
            for url in pod.engines():  # summed over the engines, as the console shows them
                with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                    page = r.read().decode()
                for m in re.finditer(series, page, re.M):
                    found[(m[1], m[2], m[3])] = found.get((m[1], m[2], m[3]), 0.0) + float(m[4])
            return found

        def acme_holds() -> bool:
            return (
                sum(v for (f, t, _), v in parts().items() if (f, t) == ("used_bytes", "acme")) > 0
            )

        wait_for(acme_holds, 30, "acme's part of the tiers in /metrics")
        shares = parts()
        engines = len(pod.engines())
        assert shares[("share_bytes", "acme", "memory")] == engines * 2**29
        assert shares[("share_bytes", "globex", "disk")] == shares[("share_bytes", "acme", "disk")]
        with chromium_page(pod.url + "/console/") as page:
            held = page.wait_for(
                "[...document.querySelectorAll('#tenants [data-key^=\"tenants.acme.\"]')]"
                ".reduce((n, e) => n + Number(e.dataset.value), 0)",
                30,
                "acme's part of the tiers on the console",
            )
            assert float(held) > 0
            rows = page.evaluate("[...document.querySelectorAll('#tenants tbody tr')].length")
            assert rows >= 3  # acme, globex, initech (and anonymous)
        # The pod's redis-server: an ACL user whose password is in a file, never on a
        # command line or in a log (the engines and the router read the file).
        shared = get_json(engine + "/kvtier/info")["shared"][0]
        assert "@" not in shared["url"] and shared["username"] == "kvtier"
        password = Path(shared["password_file"]).read_text().strip()
        assert len(password) >= 32
        lines = command_lines()
        assert not [line for line in lines if password in line]
        assert any("password_file" in line for line in lines)  # the path, in the engines'
        logs = [pod.log, *pod.log.parent.rglob("*.log")]
        text = "".join(p.read_text(errors="replace") for p in logs)
    assert all(secret not in text for secret in (ACME, GLOBEX, INITECH, password))
