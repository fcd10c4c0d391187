"""A Redis tier storing int8 KV through `kvtier serve` (--codec auto, and by default once the
model passed the gate): a restarted server's hit comes from Redis, decoded, and its greedy
answers match a cold server's."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier import gate
from kvtier.config import GATE_VAR
from kvtier.integrations.model import model_fingerprint, prepare_default_model
from kvtier.redis_process import RedisServer

from serving import serve

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")

FACTS = " ".join(f"The locker code of employee {i} is {1000 + 37 * i}." for i in range(60))
QUESTIONS = [f"\nQuestion: What is the locker code of employee {i}?\nAnswer:" for i in (7, 33)]


def test_an_int8_redis_tier_serves_a_restarted_server_the_same_answers(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate_dir = tmp_path / "gate"
    gate_env = {GATE_VAR: str(gate_dir)}
    url = redis_server.url
    prompts = [FACTS + q for q in QUESTIONS]
    client = redis_server.client()
    with serve(
        None, tmp_path / "cold.log", "--redis", url, "--codec", "redis=none", env=gate_env
    ) as cold:
        reference = [cold.complete(p, max_tokens=8) for p in prompts]
    raw_bytes = client.info("memory")["used_memory"]  # the same prompts' KV in fp32
    client.flushall()
    # The gate passed int8 for this model (as `kvtier bench fidelity --gate` records it):
    # --codec auto, and no --codec, then give the Redis tier int8.
    model = prepare_default_model(dtype="float32")
    rows = [
        {"codec": c, "top1_agreement": 1.0, "kl_mean": 0.0002, "accuracy": 0.5}
        for c in ("bf16", "int8")
    ]
    monkeypatch.setenv(GATE_VAR, str(gate_dir))
    gate.record(
        model_fingerprint(str(model)),
        str(model),
        "float32",
        {"reference_accuracy": 0.5, "codecs": rows},
    )
    with serve(None, tmp_path / "first.log", "--redis", url, "--codec", "auto", env=gate_env) as s:
        for p in prompts:
            s.complete(p, max_tokens=8)  # computed; int8 copies queued for Redis
        assert "--codec auto: redis stores int8" in s.tail(1 << 20)
    # without --codec, a server stores what the model passed too (the second: it reads)
    with serve(None, tmp_path / "second.log", "--redis", url, env=gate_env) as second:
        again = [second.complete(p, max_tokens=8) for p in prompts]
        log = second.tail(1 << 20)
    assert "no --codec: redis stores int8" in log
    assert "from redis" in log, log[-3000:]
    assert all(a.cached_tokens and a.cached_tokens > 700 for a in again), again
    assert [a.text for a in again] == [r.text for r in reference], (again, reference)
    # int8 with a scale per 64 values: 0.27x of fp32's bytes (plus Redis's own ~1 MB)
    assert client.info("memory")["used_memory"] < 0.35 * raw_bytes, raw_bytes
