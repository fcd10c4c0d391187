"""``kvtier config``: print the effective configuration (defaults + YAML + KVTIER_*)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import yaml

from kvtier.config import load_config


def register(sub: Any) -> None:
    p = sub.add_parser(
        "config",
        help="show the effective configuration",
        description="Print the configuration kvtier would use: defaults, then the YAML file"
        " (--config or $KVTIER_CONFIG), then KVTIER_* variables. Errors name the bad key.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML configuration file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    data = dataclasses.asdict(config)
    data["tiers"] = [dataclasses.asdict(t) for t in config.tiers]
    print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0
