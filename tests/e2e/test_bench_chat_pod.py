"""`kvtier bench chat --pod 2` end to end: the same bursts through a `kvtier pod` of two
engines behind its router, as the README runs it (here one path and one burst). The pod's
engines schedule hits first (the router's state says so), and the burst's returning turns,
whose contexts are cached in the pod, answer before its cold first turn.

Apart from the other engine tests so that the test processes share them out.
"""

from __future__ import annotations

import pytest

from kvtier.bench.chat import report

from procs import kvtier_json

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")


def test_bench_chat_through_a_pod_serves_the_returning_turns_first() -> None:
    args = ["--pod", "2", "--bursts", "1", "--met", "2", "--burst", "3"]
    args += ["--history", "1500", "--answer", "4"]
    more = ["--isolated", "1", "--modes", "hits-first"]
    result = kvtier_json("bench", "chat", *args, *more)
    row = result["rows"]["hits-first"]
    assert result["pod"] == 2 and row["model_in"] == "kvtier pod, 2 engines"
    assert row["hits_first"] is True  # both engines, from the router's /router/state
    assert row["failed"] == 0 and row["requests"] == 3  # one burst of three
    (cold,) = [t for t in row["turns"] if t["turn"] == 0]
    returning = [t for t in row["turns"] if t["turn"] > 0]
    assert all(t["cached_tokens"] > 1000 for t in returning), returning  # their contexts hit
    assert max(t["ttft_s"] for t in returning) < cold["ttft_s"], row["turns"]
    text = report(result)
    assert "through kvtier pod (2 engines, router)" in text, text
