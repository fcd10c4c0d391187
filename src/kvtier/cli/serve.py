"""``kvtier serve``: placeholder until the vLLM connector lands (it says so, and fails)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

_NOT_YET = """\
kvtier serve: not available yet.

Serving (vLLM's OpenAI-compatible server with the kvtier KV connector on SmolLM2-135M) comes
with the vLLM connector, which is the next piece of work. What works today:

  kvtier bench store --tier memory|disk|redis   measure the store against the raw medium
  kvtier inspect --disk DIR [--verify]          look into (and check) a disk tier
  kvtier config                                 show the effective configuration
  python: from kvtier import open_store, load_config, Namespace, KVChunk
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="run vLLM with the kvtier connector (coming with the connector)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(_NOT_YET, file=sys.stderr)
    return 1
