"""``kvtier tenants``: API keys for a tenants file (``kvtier serve --tenants FILE``).

``kvtier tenants init FILE`` starts a tenants file, with a secret file beside it (the key of
every tenant's cache salt: without it, whoever reads the chunk keys an engine lists could test
a guessed prompt of a named tenant). The file holds each key's hash, never the key:
``kvtier tenants key NAME`` makes a key, writes
it to ``--key-file`` (readable by you alone; without it, to stderr) for you to give to the
tenant, and prints the file entry with its hash. ``kvtier tenants hash`` reads keys you already
have from standard input, one per line, never from the command line (a command line is
visible to every user of the machine), and prints their hashes.

``kvtier tenants master-key FILE`` writes a master key for encryption at rest (``kvtier serve
--master-key-file FILE``: every chunk below DRAM sealed with AES-256-GCM, a key per tenant
derived from it); ``--rotate`` puts a new key first in an existing file: new chunks are sealed
with it, chunks sealed with the older keys still open. Remove an old key from the file and
its chunks become misses.

examples:
  kvtier tenants init tenants.yaml
  kvtier tenants key acme --key-file acme.key >> tenants.yaml
  kvtier tenants hash < keys.txt
  kvtier tenants master-key master.key
  kvtier tenants forget acme --tenants tenants.yaml --disk ~/.cache/kvtier/chunks
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvtier.errors import ConfigError
from kvtier.sealing import MasterKeys, new_master_key
from kvtier.tenants import (
    ANONYMOUS,
    hash_key,
    load_tenants,
    new_key,
    new_secret,
    tenant_id,
    valid_name,
)
from kvtier.tiers import DiskTier, RedisTier, Tier
from kvtier.tiers.sealed import forget

MASTER_HEADER = "# kvtier master keys: the first seals, all open (keep this file secret)\n"


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
    master = tsub.add_parser(
        "master-key", help="write a master key for encryption at rest (readable by you alone)"
    )
    master.add_argument("file", help="the key file (a new one, unless --rotate)")
    master.add_argument(
        "--rotate",
        action="store_true",
        help="put a new key first in an existing file (older keys stay, to open old chunks)",
    )
    master.set_defaults(run=_master_key)
    forget = tsub.add_parser(
        "forget",
        help="crypto-shred a tenant's sealed chunks in a disk tier and/or Redis",
        description=FORGET_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    forget.add_argument("name", help="the tenant (as the tenants file names it)")
    forget.add_argument("--tenants", required=True, metavar="FILE", help="the tenants file")
    forget.add_argument("--disk", metavar="DIR", action="append", help="a disk tier's directory")
    forget.add_argument("--redis", metavar="URL", help="a Redis tier, redis://host:port/db")
    forget.add_argument("--prefix", default="kvtier", help="redis: key prefix (kvtier)")
    forget.add_argument("--redis-user", metavar="NAME", help="redis: the ACL user")
    forget.add_argument(
        "--redis-password-file", metavar="FILE", help="redis: a file holding its password"
    )
    forget.set_defaults(run=_forget)


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


def _master_key(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not args.rotate:
        _private(path, f"{MASTER_HEADER}{new_master_key()}\n", 0o600)
        print(f"kvtier tenants: master key in {path} (yours alone)", file=sys.stderr)
        return 0
    old = MasterKeys.load(str(path))  # an unreadable or malformed file fails here, unchanged
    assert old is not None
    kept = "".join(f"{k.hex()}\n" for k in old.keys)
    fresh = path.with_name(path.name + ".new")
    fresh.unlink(missing_ok=True)
    _private(fresh, f"{MASTER_HEADER}{new_master_key()}\n{kept}", 0o600)
    os.replace(fresh, path)
    print(
        f"kvtier tenants: {path} seals with a new key now; its {len(old.keys)} older key(s)"
        " still open what they sealed (restart the servers to use it)",
        file=sys.stderr,
    )
    return 0


FORGET_HELP = """Crypto-shred a tenant's chunks sealed at rest (kvtier serve --master-key-file):
in each tier given, the tenant's epoch is deleted first (every chunk sealed under it is then
unreadable, in the tier and in any copy, even with the master key; servers using the tier
stop reading them within a second), then every chunk whose header names the tenant is
removed. No master key is needed. Copies in a running server's DRAM tier and vLLM's own
cache are not reached: restart the servers (or let them evict) to drop those.

examples:
  kvtier tenants forget acme --tenants tenants.yaml --disk ~/.cache/kvtier/chunks
  kvtier tenants forget acme --tenants tenants.yaml --redis redis://127.0.0.1:6379/0
"""


def _forget(args: argparse.Namespace) -> int:
    tenants = load_tenants(args.tenants)
    if args.name not in tenants.names and args.name != ANONYMOUS:
        raise ConfigError(f"{args.tenants}: no tenant named {args.name!r}")
    if not args.disk and not args.redis:
        raise ConfigError("name the tiers to forget the tenant in: --disk DIR, --redis URL")
    tenant = bytes.fromhex(tenant_id(args.name, tenants.secret))
    tiers: list[tuple[str, Tier]] = []
    for path in args.disk or ():
        if not Path(path).expanduser().is_dir():
            raise ConfigError(f"--disk {path}: no such directory")
        tiers.append((f"disk {path}", DiskTier(path, 2**62)))
    if args.redis:
        user, secret = args.redis_user or "", args.redis_password_file or ""
        redis = RedisTier(args.redis, prefix=args.prefix, username=user, password_file=secret)
        tiers.append((f"redis {args.redis}", redis))
    try:
        for where, tier in tiers:
            bar = tqdm(desc=f"forget {args.name}", unit="chunk", file=sys.stderr, disable=None)
            with bar:
                done = forget(tier, tenant, progress=bar.update)
            state = "epoch deleted" if done.epoch_deleted else "no epoch there"
            print(f"kvtier tenants: {args.name} in {where}: {state}, {done.removed} chunks removed")
    finally:
        for _, tier in tiers:
            tier.close()
    return 0
