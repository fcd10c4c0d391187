"""vLLM v1 KV connector: vLLM loads prompt KV from kvtier's tiers instead of recomputing it.

Use with ``--kv-transfer-config '{"kv_connector": "KvtierConnector",
"kv_connector_module_path": "kvtier.integrations.vllm", "kv_role": "kv_both",
"kv_connector_extra_config": {<kvtier configuration, as in kvtier.yaml>}}'``.

The rooms, in the order the data goes: :mod:`.connector` (the front vLLM calls) hands each call
to :mod:`.scheduler` or :mod:`.worker` by role; :mod:`.context` is what both derive from vLLM's
configuration, :mod:`.messages` what they tell each other each step, :mod:`.loader` and
:mod:`.saver` move chunks between kvtier's store and vLLM's blocks (:mod:`.paged`: the blocks'
layouts, :mod:`.chunk_pool`: reused chunk buffers), :mod:`.metrics` what shows on vLLM's
``/metrics`` and in the per-request log lines.

Scheduler side: ``get_num_new_matched_tokens`` asks the store how many leading prompt tokens
it holds (whole chunks, then a tail of 16-token granules, leaving at least one token to
compute); the metadata of each step lists the chunks to load into the request's blocks and the
newly completed prompt chunks to save, and once a prompt is computed, its tail: its tokens after
its last full chunk, to a granule, so that reuse is finer than vLLM's own blocks. While other
requests run, a hit from disk or Redis is loaded in the background (the request waits in
WAITING_FOR_REMOTE_KVS; ``loads`` in the extra config: auto, async or sync). Worker side
(:mod:`.loader`): loads copy each chunk once, from where kvtier holds it into the blocks; saves
gather the blocks straight into encoded chunks, leaving checksums and tier writes to a
background thread. Chunks that fail to load are reported through
``get_block_ids_with_load_errors`` for vLLM to recompute (kvtier sets
``kv_load_failure_policy=recompute``: a cache must never fail a request). With
``write_through`` (a prefill engine of a disaggregated pod), saves write every tier inline, so
the request's answer leaves only once the shared tier holds its prompt.

The package imports vLLM only when the connector is asked for (``kvtier.integrations.vllm.paged``
and ``.chunk_pool`` need torch alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.integrations.vllm.connector import KvtierConnector, flush_all

__all__ = ["KvtierConnector", "flush_all"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kvtier.integrations.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
