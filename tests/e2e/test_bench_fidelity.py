"""`kvtier bench fidelity` on the real embedded model: the table, the gate's record, and the
ordering any sound measure must show (4 bits cost more than 8, bf16 nearly nothing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

KVTIER = shutil.which("kvtier", path=str(Path(sys.executable).parent)) or "kvtier"


def test_bench_fidelity_measures_codecs_and_records_the_gate(tmp_path: Path) -> None:
    env = {**os.environ, "KVTIER_FIDELITY_DIR": str(tmp_path)}
    command = [KVTIER, "bench", "fidelity", "--contexts", "1", "--tokens", "800", "--gate"]
    command += ["--codecs", "bf16,int8,int4,int4r", "--json"]  # the README's run has fp8 too
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    rows = {r["codec"]: r for r in result["codecs"]}
    assert set(rows) == {"bf16", "int8", "int4", "int4r"}
    assert result["questions"] == 8 and result["context_tokens"][0] > 600
    assert all(r["positions"] >= 64 for r in rows.values())  # teacher-forced positions
    assert rows["bf16"]["kl_mean"] < rows["int8"]["kl_mean"] < rows["int4"]["kl_mean"]
    assert rows["bf16"]["top1_agreement"] >= 0.99 and rows["bf16"]["kl_mean"] < 0.001
    assert rows["int4"]["kl_mean"] > 0.001  # 4 bits are not free
    # rotated before quantizing, 4 bits cost less: outliers no longer set a group's range
    assert rows["int8"]["kl_mean"] < rows["int4r"]["kl_mean"] < rows["int4"]["kl_mean"]
    # The engine's own floor: the same KV recomputed in 256-token pieces. Exact in fp32,
    # bf16's rounding moves it; either way nearer the reference than 4 bits.
    floor = result["floor"]
    assert floor["codec"] == "recomputed" and floor["positions"] == rows["int8"]["positions"]
    assert floor["kl_mean"] < rows["int4"]["kl_mean"]
    if result["dtype"] == "float32":
        assert floor["kl_mean"] < 1e-5 and floor["top1_agreement"] == 1.0
    record = json.loads(Path(result["gate_file"]).read_text())
    assert Path(result["gate_file"]).parent == tmp_path
    line = 0.99 - (1 - floor["top1_agreement"])
    assert "bf16" in record["passed"] and record["thresholds"]["top1_min"] == line
    assert set(record["passed"]) <= set(rows)
