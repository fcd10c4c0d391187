"""A small `kvtier serve` for e2e tests: fp32 (exact outputs), vLLM's own prefix cache off (hits
come from kvtier), 512 MiB of DRAM, 4,096-token contexts, cached tokens in the usage report."""

from __future__ import annotations

from pathlib import Path

from kvtier.redis_process import free_port
from kvtier.runtime.engine_process import Server, kvtier_serve_command


def serve(disk: Path | None, log: Path, *options: str, env: dict[str, str] | None = None) -> Server:
    """A server whose disk tier is ``disk`` (None: no disk tier); ``options`` go last."""
    port = free_port()
    command = kvtier_serve_command(
        port,
        "--disk",
        str(disk) if disk is not None else "none",
        "--dram",
        "512MiB",
        "--max-model-len",
        "4096",
        "--no-enable-prefix-caching",
        "--dtype",
        "float32",
        "--enable-prompt-tokens-details",
        *options,
    )
    return Server(command, port, log, env={"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})
