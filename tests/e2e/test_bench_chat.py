"""`kvtier bench chat` end to end: the benchmark's own command, through the server it starts
(`kvtier serve`, hits first as it runs by default). In every burst the returning turns, whose
contexts are cached, answer before the cold first turn that arrived with them (under vLLM's
own first-come first-served order they wait for its first step: tests/unit/test_hits_first.py
shows both side by side).

Apart from the other engine tests so that the test processes share them out.
"""

from __future__ import annotations

import pytest

from kvtier.bench.chat import report

from procs import kvtier_json

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")


def test_bench_chat_serves_the_returning_turns_of_a_burst_before_its_cold_one() -> None:
    args = ["--bursts", "2", "--burst", "3", "--met", "2", "--history", "1500", "--answer", "4"]
    more = ["--isolated", "1", "--modes", "hits-first"]
    result = kvtier_json("bench", "chat", *args, *more)
    row = result["rows"]["hits-first"]
    assert row["failed"] == 0 and row["requests"] == 6  # two bursts of three
    turns = row["turns"]
    for burst in (0, 1):
        these = [t for t in turns if t["burst"] == burst]
        (cold,) = [t for t in these if t["turn"] == 0]
        returning = [t for t in these if t["turn"] > 0]
        assert len(returning) == 2 and cold["cached_tokens"] < 256
        assert all(t["cached_tokens"] > 1000 for t in returning), these  # their contexts hit
        assert max(t["ttft_s"] for t in returning) < cold["ttft_s"], these
    assert row["isolated_hit_s"] > 0 and row["prefill_tokens_per_s"] > 0
    assert row["returning_median_s"] < row["first_median_s"]
    text = report(result)  # what the command prints without --json
    assert "measured on: " in text and "returning median / isolated hit" in text, text
