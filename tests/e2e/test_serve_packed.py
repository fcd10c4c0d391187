"""`kvtier serve` in bf16 on a CPU with AMX tiles, where vLLM packs each 128-token block of its
cache into AMX tiles (no per-token view): a prompt's tail is still stored to 16 tokens (its
last block whole) and a restarted server answers from it as the first did. Runs only where the
CPU has AMX (elsewhere vLLM's bf16 cache is not packed, and tests/e2e/test_serve.py covers the
per-token layout)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving import serve


def _amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


@pytest.mark.skipif(not _amx(), reason="vLLM packs its bf16 cache only on CPUs with AMX tiles")
def test_a_packed_cache_reuses_its_tail_to_16_tokens(tmp_path: Path) -> None:
    chunks = tmp_path / "chunks"
    prompt = " ".join(f"The {i}th line of a long shared document." for i in range(100))
    with serve(chunks, tmp_path / "first.log", "--dtype", "bfloat16") as server:
        first = server.complete(prompt, max_tokens=8)
    with serve(chunks, tmp_path / "second.log", "--dtype", "bfloat16") as server:
        second = server.complete(prompt, max_tokens=8)
        log = server.tail(1 << 20)
    assert "from disk" in log, log[-3000:]
    # 1,184 of 1,190 tokens: the tail ends inside the tenth 128-token block, not on it (1,152)
    assert second.cached_tokens == (second.prompt_tokens - 1) // 16 * 16
    assert second.cached_tokens % 128
    assert second.text == first.text
