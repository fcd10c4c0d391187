"""``kvtier bench ttft``'s example_connector path: vLLM's ExampleConnector, written by one
plain vLLM server and read by a restarted one, a server per length (the connector crashes the
engine on long prompts: that length's row records the failure)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from kvtier.bench.common import NO_PREFIX_CACHE, prompt
from kvtier.errors import KvtierError

if TYPE_CHECKING:
    from kvtier.bench.ttft import _Run


def example_paths(bench: _Run, lengths: list[int]) -> None:
    r = bench.args.repeat
    path = str(bench.work / "example")
    transfer = json.dumps(
        {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": path},
        }
    )
    options = ("--kv-transfer-config", transfer, *NO_PREFIX_CACHE)
    for n in lengths:  # a server per length: the connector crashes the engine on long prompts
        ids = prompt("example", n, 0)
        try:
            with bench.vllm(*options) as writer:
                bench.send(writer, ids)
            with bench.vllm(*options) as reader:
                bench.measure(reader, "example_connector", {n: [ids] * r})
        except (KvtierError, OSError) as exc:
            bench.record(n, "example_connector", [], str(exc))
