"""``kvtier router``: the KV-aware router alone, in front of engines started elsewhere.

Every engine must be a ``kvtier serve`` (it publishes what its tiers hold under /kvtier/ on
its own port). The router computes each prompt's chunk keys with the model's tokenizer, finds
where those chunks are (each engine's DRAM and disk, and the tier they share), and sends the
request to the engine with the lowest expected time to first token.
"""

from __future__ import annotations

import argparse
from typing import Any

from kvtier.errors import KvtierError

EXAMPLE = """\
examples:
  kvtier serve --port 8001 --redis redis://10.0.0.9:6379/0      # on each engine machine
  kvtier router --worker http://10.0.0.5:8001 --worker http://10.0.0.6:8001 --port 8000
  kvtier router --worker http://127.0.0.1:8001 --worker http://127.0.0.1:8002 --policy round-robin
  kvtier router --prefill http://10.0.0.5:8001 --decode http://10.0.0.6:8001   # disaggregated
      (start the prefill engines with `kvtier serve --write-through`)
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "router",
        help="route OpenAI requests to the kvtier engine where their context already is",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="URL",
        help="an engine's base URL (repeat for each engine)",
    )
    p.add_argument(
        "--prefill",
        action="append",
        default=[],
        metavar="URL",
        help="a prefill engine (`kvtier serve --write-through`): new prompts are computed"
        " there, written to the shared tier, and decoded on a --decode engine",
    )
    p.add_argument(
        "--decode",
        action="append",
        default=[],
        metavar="URL",
        help="a decode engine of a disaggregated pod (it also prefills what it mostly holds)",
    )
    add_router_options(p)
    p.set_defaults(run=run)


def add_router_options(p: argparse.ArgumentParser) -> None:
    """Options ``kvtier router`` and ``kvtier pod`` share."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    p.add_argument(
        "--policy",
        default="kvtier",
        choices=("kvtier", "round-robin"),
        help="kvtier (default): lowest expected time to first token, from where each prompt's"
        " chunks are and each engine's queue; round-robin: in turn, ignoring the cache",
    )
    p.add_argument(
        "--tenants",
        metavar="FILE",
        help="tenants file (YAML, as given to every engine's `kvtier serve --tenants`):"
        " requests are authenticated by their API key and routed on their own tenant's"
        " cached context only (docs/tenants.md)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="the engines' model directory, for the tokenizer and chat template"
        " (default: the embedded SmolLM2-135M-Instruct)",
    )


def run(args: argparse.Namespace) -> int:
    for option, urls in (
        ("--worker", args.worker),
        ("--prefill", args.prefill),
        ("--decode", args.decode),
    ):
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise KvtierError(f"{option}: {url!r} is not an http:// or https:// URL")
    if args.prefill and not args.decode:
        raise KvtierError("--prefill needs at least one --decode engine to decode on")
    if args.decode and args.worker:
        raise KvtierError("give --worker (colocated engines) or --prefill/--decode, not both")
    if not args.worker and not args.decode:
        raise KvtierError("no engine: give --worker URL (repeat for each engine)")
    from kvtier.router.serve import make_router, serve_router

    engines = args.worker or args.decode
    router = make_router(engines, args.policy, args.tokenizer, args.prefill, args.tenants)
    serve_router(router, args.host, args.port)
    return 0
