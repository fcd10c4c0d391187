"""``kvtier sim``: replay a request trace (or a synthetic workload) through kvtier's tiers and
eviction policies, with chosen capacities, and compare with the offline optimum (Belady) and an
infinite cache. Hit semantics: a request reuses the longest run of its leading 512-token blocks
held by a tier its node reads; every block is then touched or written, in order."""

from __future__ import annotations

import argparse
from typing import Any

_EXAMPLES = """\
capacities: --dram/--ssd per node, --shared and --object (G4) for the pod take sizes (2TB,
512GiB), turned into 512-token blocks with the model's KV bytes per token; --blocks N is one
DRAM tier of N blocks. With none of them, the hardware profile's DRAM and SSD per node are used.

examples:
  kvtier sim ../shared/traces/conversation_trace.jsonl --dram 1TB --ssd 8TB
  kvtier sim ../shared/traces/conversation_trace.jsonl --dram 1TB --ssd 8TB --codec int8
  kvtier sim trace.jsonl --blocks 20000 --policy s3fifo --json
  kvtier sim trace.jsonl --nodes 4 --routing cache-aware --dram 1TB --shared 20TB
  kvtier sim trace.jsonl --nodes 4 --dram 1TB --shared 20TB --object 500TB   # + G4 (S3)
  kvtier sim trace.jsonl --sweep --out sweep        # sweep.png + sweep.json, every policy
  kvtier sim --workload chat --users 500 --turns 8 --dram 512GiB
"""


def register(sub: Any) -> None:
    from kvtier import quant
    from kvtier.policy.eviction import POLICY_NAMES
    from kvtier.sim.engine import ROUTINGS
    from kvtier.sim.synthetic import WORKLOADS

    p = sub.add_parser(
        "sim",
        help="replay a trace through tiers and policies; hit rates, TTFT, Belady bound",
        description=__doc__,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", nargs="?", help="Mooncake-format JSONL trace (or use --workload)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed lines, count them")
    w = p.add_argument_group("synthetic workload (instead of a trace)")
    w.add_argument("--workload", choices=WORKLOADS, help="generate requests instead")
    w.add_argument("--users", type=int, default=200, help="chat: conversations (default 200)")
    w.add_argument("--turns", type=int, default=6, help="chat: turns each (default 6)")
    w.add_argument("--system-tokens", type=int, default=2048, help="shared system prompt")
    w.add_argument("--docs", type=int, default=500, help="rag: documents (Zipf popularity)")
    w.add_argument("--doc-tokens", type=int, default=4096, help="rag: tokens per document")
    w.add_argument("--questions", type=int, default=2000, help="rag: requests")
    m = p.add_argument_group("model and hardware (block size, TTFT estimate)")
    m.add_argument("--model", default="Llama-3.1-70B", help="preset or config.json (Llama-3.1-70B)")
    m.add_argument("--dtype", default="bf16", help="KV dtype (default bf16)")
    m.add_argument("--hardware", default="H100", help="node profile, as in kvtier plan (H100)")
    c = p.add_argument_group("tiers and policy")
    c.add_argument("--dram", help="DRAM per node, a size")
    c.add_argument("--ssd", help="local SSD per node, a size")
    c.add_argument("--shared", help="one tier shared by every node, a size")
    c.add_argument(
        "--object",
        metavar="SIZE",
        help="object storage (G4, S3) shared by every node, below --shared, a size",
    )
    c.add_argument("--blocks", type=int, help="a single DRAM tier of N 512-token blocks")
    c.add_argument(
        "--policy",
        help=f"eviction: {', '.join(POLICY_NAMES)} (default lru; --sweep: all, or a comma list)",
    )
    c.add_argument(
        "--codec",
        choices=quant.LOSSY,
        help="the tiers below DRAM (--ssd, --shared) store KV with this codec: more blocks in"
        " the same bytes, fewer bytes per hit (bytes per token as `kvtier plan --codec`)",
    )
    c.add_argument("--nodes", type=int, default=1, help="serving nodes (default 1)")
    c.add_argument("--routing", default="cache-aware", help=f"{', '.join(ROUTINGS)} (the first)")
    c.add_argument("--seed", type=int, default=0, help="random routing and workloads")
    s = p.add_argument_group("sweep")
    s.add_argument(
        "--sweep",
        nargs="?",
        const="auto",
        metavar="CAPS",
        help="hit rate vs capacity: comma-separated block counts or sizes (default: 1%%..100%%"
        " of the distinct blocks); every policy unless --policy lists some",
    )
    s.add_argument("--out", default="kvtier-sweep", help="sweep output prefix (.png, .json)")
    p.add_argument("--no-bounds", action="store_true", help="skip the Belady and infinite runs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.sim.command import run as simulate_command  # numpy and the simulator: lazily

    return simulate_command(args)
