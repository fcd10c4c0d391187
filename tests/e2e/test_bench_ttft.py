"""`kvtier bench ttft` end to end: the benchmark's own command, through the servers it
starts (`kvtier serve`, and vLLM's own server for the cold baseline).

Apart from the other engine tests so that the test processes share them out.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")


def test_bench_ttft_prints_its_rows_through_kvtier_serve() -> None:
    kvtier = shutil.which("kvtier", path=str(Path(sys.executable).parent)) or "kvtier"
    proc = subprocess.run(
        [
            kvtier,
            "bench",
            "ttft",
            "--tokens",
            "700",
            "--tiers",
            "disk,s3",
            "--no-example",
            "--no-overhead",
            "--repeat",
            "1",
            "--codec",
            "int8",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    paths = {row["path"]: row for row in result["rows"]}
    assert set(paths) == {
        "cold_vllm",
        "cold",
        "vllm_prefix",
        "kvtier_disk",
        "kvtier_disk_int8",
        "kvtier_s3",
    }
    missing = {p: r for p, r in paths.items() if not (r["ttft_s"] and r["ttft_s"] > 0)}
    assert not missing, (missing, result["errors"], proc.stderr[-2000:])
    # 700 tokens: vLLM computes at least the last one; its own cache reuses whole 128-token
    # blocks, kvtier its chunks and a tail of whole 16 tokens.
    assert paths["cold"]["recomputed_tokens"] == 700
    assert paths["vllm_prefix"]["recomputed_tokens"] == 700 - 640
    assert paths["kvtier_disk"]["recomputed_tokens"] == 700 - 688
    # Each kvtier server's first request of a length is sent, reported and not counted; the
    # plain server's prefix hits follow its cold requests.
    for path in ("cold", "kvtier_disk", "kvtier_disk_int8", "kvtier_s3"):
        assert len(paths[path]["warm_up_s"]) == 1 and len(paths[path]["times_s"]) == 1, path
    assert "warm_up_s" not in paths["vllm_prefix"] and "warm_up_s" not in paths["cold_vllm"]
    # --codec int8: the same chunks stored int8 (a fourth of fp32's bytes, half of bf16's),
    # read by a server started with --codec disk=int8: the same hit.
    assert paths["kvtier_disk_int8"]["recomputed_tokens"] == 700 - 688
    assert paths["kvtier_disk_int8"]["ttft_s"] < 0.7 * paths["cold"]["ttft_s"], result
    coded = result["codec"]
    assert coded["name"] == "int8" and 0 < coded["stored_bytes"] < 0.55 * coded["raw_bytes"]
    assert coded["decode_gb_s"] > 0
    # A hit is a hit: loading 700 tokens' KV from disk takes a fraction of computing them.
    assert paths["kvtier_disk"]["ttft_s"] < 0.7 * paths["cold"]["ttft_s"], result
    # Every server computed on the same cores (plain vLLM would keep one for its scheduler).
    assert len({str(cores) for cores in result["cores"].values()}) == 1, result["cores"]
    # ... in one process layout (kvtier serve's on this host; plain vLLM follows it).
    assert len(set(result["model_in"].values())) == 1, result["model_in"]
    assert result["raw"]["700"]["disk_cold_read_s"] > 0
    # kvtier_s3: a restarted server with no disk, whose only copy is in a private SeaweedFS
    # the benchmark started: the same hit, and the raw GETs of as many bytes beside it.
    assert paths["kvtier_s3"]["recomputed_tokens"] == 700 - 688
    assert paths["kvtier_s3"]["ttft_s"] < 0.7 * paths["cold"]["ttft_s"], result
    assert result["raw"]["700"]["s3_get_s"] > 0 and result["raw"]["700"]["s3_get_bytes"] > 0
