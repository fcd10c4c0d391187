"""Building kvtier's C kernels for the host (:mod:`kvtier.native` loads them): every ``*.c``
here compiled into one library by the system's compiler, for this CPU's own vector
instructions. The library is cached under ``$XDG_CACHE_HOME/kvtier/native`` (``~/.cache``),
named by a digest of the sources, the flags, the compiler and the CPU's flags: hosts sharing a
home directory never load each other's.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = sorted(Path(__file__).parent.glob("*.c"))  # int8.c, int4.c, copy.c: one library
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
# No contraction of a multiply and an add into one FMA: the kernels round as torch does.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC"]
if platform.machine() in ("x86_64", "AMD64"):
    # gcc keeps to 256-bit vectors by default even with AVX-512; 512 ran this loop 1.7x faster
    # on a 2-core Xeon (the clock does not drop for so short a burst).
    FLAGS.append("-mprefer-vector-width=512")
BUILD_TIMEOUT_S = 120


def build() -> Path:
    """The library for this host: built now unless the cache holds it. Raises OSError where
    there is no compiler or it fails (SubprocessError where it hangs)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc) on PATH")
    source = b"\0".join(p.read_bytes() for p in SOURCES + HEADERS)
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    digest = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_flags()])
    ).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvtier" / "native"
    path = cache / f"int8-{digest}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / path.name
        done = subprocess.run(
            [compiler, *FLAGS, "-o", str(built), *map(str, SOURCES)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-300:]}")
        os.replace(built, path)  # atomic: a process building beside this one loads either
    return path


def _cpu_flags() -> bytes:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_bytes().splitlines():
            if line.startswith((b"flags", b"Features")):
                return line
    except OSError:
        pass
    return platform.processor().encode()
