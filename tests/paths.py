"""Where the tests find things: the helpers beside this file, the repository, its README and the
shared traces (tests are sorted into unit/, integration/ and e2e/ below this folder)."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
README = REPO / "README.md"
TRACES = REPO.parent / "shared" / "traces"
