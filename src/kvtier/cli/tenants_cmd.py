"""``kvtier tenants``: API keys for a tenants file (``kvtier serve --tenants FILE``).

The file holds each key's hash, never the key: ``kvtier tenants key NAME`` makes a key, writes
it to ``--key-file`` (readable by you alone; without it, to stderr) for you to give to the
tenant, and prints the file entry with its hash. ``kvtier tenants hash`` reads keys you already
have from standard input, one per line, never from the command line (a command line is
visible to every user of the machine), and prints their hashes.

examples:
  echo "tenants:" > tenants.yaml
  kvtier tenants key acme --key-file acme.key >> tenants.yaml
  kvtier tenants hash < keys.txt
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from kvtier.errors import ConfigError
from kvtier.tenants import hash_key, new_key, valid_name


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tenants",
        help="API keys for a tenants file (kvtier serve --tenants FILE)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tsub = p.add_subparsers(dest="tenants_command", metavar="COMMAND", required=True)
    key = tsub.add_parser(
        "key", help="make a new API key: the key on stderr, the file entry on stdout"
    )
    key.add_argument("name", help="the tenant's name (letters, digits, '_', '.', '-')")
    key.add_argument(
        "--key-file",
        metavar="FILE",
        help="write the key here, readable by you alone (a new file; default: stderr)",
    )
    key.set_defaults(run=_key)
    hashed = tsub.add_parser("hash", help="the hash of each key read from stdin, one per line")
    hashed.set_defaults(run=_hash)


def _key(args: argparse.Namespace) -> int:
    if not valid_name(args.name):
        raise ConfigError(
            f"tenant name {args.name!r}: 1-64 letters, digits, '_', '.', '-'"
            " ('anonymous' is reserved for requests without a key)"
        )
    key = new_key()
    if args.key_file:
        try:
            fd = os.open(args.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"--key-file {args.key_file}: exists; not overwritten") from None
        except OSError as exc:
            raise ConfigError(f"--key-file {args.key_file}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
    else:
        print(
            f"kvtier tenants: API key of {args.name} (shown once; keep it secret):", file=sys.stderr
        )
        print(key, file=sys.stderr)
    print(f"  - name: {args.name}\n    keys: [{hash_key(key)}]")
    return 0


def _hash(args: argparse.Namespace) -> int:
    keys = [line.strip() for line in sys.stdin if line.strip()]
    if not keys:
        raise ConfigError("no key on standard input (one per line)")
    for key in keys:
        print(hash_key(key))
    return 0
