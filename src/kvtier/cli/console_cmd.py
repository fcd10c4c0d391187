"""``kvtier console``: the live context-memory console for engines without a router.

It scrapes each engine's ``/metrics`` (vLLM's, where kvtier's ``kvtier:*`` series are) every
two seconds and serves a page that charts hit rate per tier, prefill seconds saved, bytes/s
per tier, occupancy and health of every tier, engine load and time to first token. A pod's
router serves the same page at its own ``/console/`` (with its routing decisions).
"""

from __future__ import annotations

import argparse
from typing import Any

from kvtier.errors import KvtierError

EXAMPLE = """\
examples:
  kvtier serve --port 8000 &                      # an engine
  kvtier console --metrics http://127.0.0.1:8000/metrics --port 9000
  open http://127.0.0.1:9000/console/
  kvtier console --metrics http://h1:8001/metrics --metrics http://h2:8001/metrics \\
                 --router http://h0:8000          # with a router's decisions
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "console",
        help="a live web console of the engines' kvtier metrics",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="URL",
        help="an engine's /metrics URL (repeat for each engine)",
    )
    p.add_argument(
        "--router", metavar="URL", help="a kvtier router's base URL: show its routing decisions too"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=9000, help="port to listen on (9000)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.console.app import missing_vendor, serve_console

    if not args.metrics:
        raise KvtierError("no engine: give --metrics URL (an engine's /metrics; repeat for each)")
    for url in [*args.metrics, *([args.router] if args.router else [])]:
        if not url.startswith(("http://", "https://")):
            raise KvtierError(f"{url!r} is not an http:// or https:// URL")
    missing = missing_vendor()
    if missing:
        raise KvtierError(
            f"the console's charting library is not installed ({', '.join(missing)}):"
            " run `make install` (scripts/install.sh installs uPlot from npm)"
        )
    try:
        serve_console(args.metrics, args.router, args.host, args.port)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        where = f"{args.host}:{args.port}"
        raise KvtierError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return 0
