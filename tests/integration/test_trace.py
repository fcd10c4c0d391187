"""Mooncake-format traces for `kvtier sim`: valid lines parsed, malformed ones named or skipped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtier.sim.trace import Request, TraceError, parse_lines, read_trace

from paths import TRACES

SHARED = TRACES
GOOD = '{"timestamp": 5, "input_length": 1100, "output_length": 7, "hash_ids": [0, 1, 2]}'


def test_lines_become_requests_in_timestamp_order() -> None:
    late = '{"timestamp": 9, "input_length": 10, "output_length": 1, "hash_ids": [4]}'
    trace = parse_lines([late, "", GOOD], "t.jsonl")
    assert trace.requests == [Request(5.0, 1100, 7, (0, 1, 2)), Request(9.0, 10, 1, (4,))]
    assert trace.skipped == 0


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "Expecting property name"),
        ("[1, 2]", "not a JSON object"),
        ('{"timestamp": -1, "input_length": 1, "output_length": 1, "hash_ids": []}', "timestamp"),
        (
            '{"timestamp": 1, "input_length": "9", "output_length": 1, "hash_ids": []}',
            "input_length",
        ),
        ('{"timestamp": 1, "input_length": 9, "output_length": 1, "hash_ids": ["a"]}', "hash_ids"),
        (
            '{"timestamp": 1, "input_length": 9, "output_length": 1, "hash_ids": [1, 2]}',
            "2 hash_ids",
        ),
    ],
)
def test_a_malformed_line_is_named_or_skipped_and_counted(line: str, message: str) -> None:
    with pytest.raises(TraceError, match=rf"t.jsonl:2: .*{message}"):
        parse_lines([GOOD, line, GOOD], "t.jsonl")
    trace = parse_lines([GOOD, line, GOOD], "t.jsonl", skip_bad=True)
    assert (len(trace.requests), trace.skipped) == (2, 1)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read trace"):
        read_trace(tmp_path / "nope.jsonl")


def test_the_conversation_trace_loads_whole_and_fast() -> None:
    path = SHARED / "conversation_trace.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    start = time.perf_counter()
    trace = read_trace(path)
    assert len(trace.requests) == 12_031 and trace.skipped == 0
    assert time.perf_counter() - start < 5
    first = trace.requests[0]
    assert first.hash_ids[0] == 0 and len(first.hash_ids) == -(-first.input_length // 512)


@pytest.mark.parametrize("nodes", [4, 16])
def test_kvtier_routing_hits_as_much_as_cache_aware_with_balanced_nodes(nodes: int) -> None:
    """The router's policy object in the simulator: on the conversation trace, at least the
    hit rate of cache-aware routing, with every node within 25% of the mean load."""
    path = SHARED / "conversation_trace.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    results = {}
    for routing in ("cache-aware", "kvtier"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "kvtier.cli.main",
                "sim",
                str(path),
                "--nodes",
                str(nodes),
                "--routing",
                routing,
                "--dram",
                "500GB",
                "--ssd",
                "2TB",
                "--shared",
                "10TB",
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        results[routing] = json.loads(out.stdout)
    ours, theirs = results["kvtier"], results["cache-aware"]
    assert ours["hit_rate_tokens"] >= theirs["hit_rate_tokens"]
    loads = ours["node_requests"]
    assert len(loads) == nodes and sum(loads) == 12_031
    mean = sum(loads) / nodes
    assert max(abs(n - mean) for n in loads) <= 0.25 * mean, loads
