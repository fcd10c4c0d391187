"""Fixtures of the unit tests of kvtier's C kernels (test_native.py, test_int4r.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import native, quant, quant4


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A process that has not built or checked the kernels yet, with its own cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checks = (native.library, quant.native_int8, quant4.native_int4r)
    for check in checks:
        check.cache_clear()
    yield
    for check in checks:
        check.cache_clear()
