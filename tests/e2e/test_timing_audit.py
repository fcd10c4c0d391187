"""A timing audit in the manner of Gu et al. ("Auditing Prompt Caching", ICML'25), through a
real `kvtier serve --tenants`: does the time to first token tell one tenant which prompts
another tenant sent?

The victim (acme) sends N prompts, so vLLM's cache and kvtier's DRAM hold them. The attacker
(globex) then sends those N prompts and N it made up, interleaved, and takes each one's time
to first token (max_tokens=1, on the client). Across tenants the two samples must come from one
distribution: a two-sample Kolmogorov-Smirnov test finds no difference (p > 0.05). Within a
tenant the same test must find one (p < 0.05): acme's own prompts again, against fresh ones,
so the audit can fail. N = 30 per sample (Gu et al. used 250 against remote APIs, whose
noise is far larger than a loopback server's; the within-tenant difference here is ~5x).

Under no difference, p <= 0.05 one time in twenty: the cross-tenant check takes a second,
fresh pair of samples before it fails (both at once: one time in four hundred).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvtier.redis_process import free_port
from kvtier.runtime.engine_process import Server, kvtier_serve_command
from kvtier.tenants import hash_key, new_key

from kstest import ks_pvalue

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")

N = 30
ACME, GLOBEX = new_key(), new_key()
WORDS = [
    "river",
    "stone",
    "cloud",
    "paper",
    "engine",
    "garden",
    "window",
    "silver",
    "market",
    "orange",
]


def made_up(rng: random.Random) -> str:
    """A prompt of ~300 tokens nobody sent before."""
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(100))


def ttft(server: Server, prompt: str, key: str) -> float:
    done = server.complete(prompt, max_tokens=1, api_key=key)
    assert done.prompt_tokens > 250
    return done.seconds


def test_ttft_tells_nothing_across_tenants_and_does_within_one(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        f"tenants:\n  - name: acme\n    keys: [{hash_key(ACME)}]\n"
        f"  - name: globex\n    keys: [{hash_key(GLOBEX)}]\n"
    )
    port = free_port()
    options = ["--disk", "none", "--dram", "512MiB", "--tenants", str(tenants)]
    command = kvtier_serve_command(port, *options, "--max-model-len", "2048", "--dtype", "float32")
    rng = random.Random(23)
    with Server(command, port, tmp_path / "serve.log", warm_up=True) as server:

        def audit() -> tuple[float, list[float], list[str]]:
            victims = [made_up(rng) for _ in range(N)]
            for prompt in victims:
                ttft(server, prompt, ACME)  # now cached, for acme
            theirs, fresh = [], []
            for prompt in victims:  # interleaved: a drift of the host's speed hits both
                theirs.append(ttft(server, prompt, GLOBEX))
                fresh.append(ttft(server, made_up(rng), GLOBEX))
            return ks_pvalue(theirs, fresh), theirs, victims

        p_across, theirs, victims = audit()
        if p_across <= 0.05:
            p_across, theirs, victims = audit()
        own = [ttft(server, prompt, ACME) for prompt in victims]
    p_within = ks_pvalue(own, theirs)
    detail = f"across p={p_across:.3f}, within p={p_within:.2e}; own {sorted(own)[N // 2]:.3f}s"
    detail += f" vs others' {sorted(theirs)[N // 2]:.3f}s median"
    assert p_across > 0.05, detail
    assert p_within < 0.05, detail
    assert sorted(own)[N // 2] < 0.7 * sorted(theirs)[N // 2], detail
