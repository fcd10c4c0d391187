"""`kvtier bench fidelity --served`: the model-level measure's questions through `kvtier serve`
(a file of its own, so that the test runner runs it beside the model-level test)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

KVTIER = shutil.which("kvtier", path=str(Path(sys.executable).parent)) or "kvtier"


def test_bench_fidelity_served_asks_the_same_questions_through_kvtier_serve(
    tmp_path: Path,
) -> None:
    """--served: a cold kvtier serve answers the questions; restarted servers whose Redis tier
    holds the raw chunks (`none`) or int8 answer them again from Redis (a real redis-server,
    the hits counted by vLLM's usage report); with --gate the record keeps the served rows."""
    env = {**os.environ, "KVTIER_FIDELITY_DIR": str(tmp_path)}
    command = [KVTIER, "bench", "fidelity", "--contexts", "1", "--tokens", "800", "--gate"]
    command += ["--codecs", "int8", "--served", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    served = result["served"]
    rows = {r["codec"]: r for r in served["rows"]}
    assert set(rows) == {"none", "int8"} and served["questions"] == 8
    for r in rows.values():  # each restart loaded the context from Redis
        assert r["hit_tokens"] > 0.9 * r["prompt_tokens"] > 0, r
    # the raw chunks' restart is the reference; against the cold server (another split into
    # steps) bf16's rounding moves some answers, fp32's hardly any
    assert rows["none"]["greedy_agreement"] == 1.0 and rows["none"]["passed"] is None
    assert rows["none"]["greedy_agreement_cold"] >= 0.5
    model = {r["codec"]: r for r in result["codecs"]}["int8"]["greedy_agreement"]
    assert rows["int8"]["model_greedy_agreement"] == model
    assert rows["int8"]["passed"] == (rows["int8"]["greedy_agreement"] >= model - 0.10)
    record = json.loads(Path(result["gate_file"]).read_text())
    assert record["served"] == served
    if not rows["int8"]["passed"]:  # a codec that failed through the product does not pass
        assert "int8" not in record["passed"]
