"""``kvtier tenants``: API keys for a tenants file (``kvtier serve --tenants FILE``).

``kvtier tenants init FILE`` starts a tenants file, with a secret file beside it (the key of
every tenant's cache salt: without it, whoever reads the chunk keys an engine lists could test
a guessed prompt of a named tenant). The file holds each key's hash, never the key:
``kvtier tenants key NAME`` makes a key, writes
it to ``--key-file`` (readable by you alone; without it, to stderr) for you to give to the
tenant, and prints the file entry with its hash. ``kvtier tenants hash`` reads keys you already
have from standard input, one per line, never from the command line (a command line is
visible to every user of the machine), and prints their hashes.

examples:
  kvtier tenants init tenants.yaml
  kvtier tenants key acme --key-file acme.key >> tenants.yaml
  kvtier tenants hash < keys.txt
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kvtier.errors import ConfigError
from kvtier.tenants import hash_key, new_key, new_secret, valid_name


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tenants",
        help="API keys for a tenants file (kvtier serve --tenants FILE)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tsub = p.add_subparsers(dest="tenants_command", metavar="COMMAND", required=True)
    init = tsub.add_parser(
        "init", help="start a tenants file, with a secret file beside it (FILE.secret)"
    )
    init.add_argument("file", help="the tenants file to create (not overwritten)")
    init.set_defaults(run=_init)
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


def _private(path: Path, text: str, mode: int) -> None:
    """Create ``path`` (never over an existing file) holding ``text``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{path}: exists; not overwritten") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _init(args: argparse.Namespace) -> int:
    path = Path(args.file)
    secret = path.with_name(path.name + ".secret")
    if path.exists():
        raise ConfigError(f"{path}: exists; not overwritten")
    _private(secret, new_secret() + "\n", 0o600)
    header = f"# kvtier tenants file (kvtier serve --tenants {path.name})\n"
    _private(path, f"{header}secret_file: {secret.name}\nanonymous: isolated\ntenants:\n", 0o644)
    print(f"kvtier tenants: {path} and its secret {secret} (yours alone)", file=sys.stderr)
    return 0


def _key(args: argparse.Namespace) -> int:
    if not valid_name(args.name):
        raise ConfigError(
            f"tenant name {args.name!r}: 1-64 letters, digits, '_', '.', '-'"
            " ('anonymous' is reserved for requests without a key)"
        )
    key = new_key()
    if args.key_file:
        _private(Path(args.key_file), key + "\n", 0o600)
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
