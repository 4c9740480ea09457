"""Where things are in the checkout, for tests at any depth of tests/."""

from __future__ import annotations

from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
TESTS = SUPPORT.parent
ROOT = TESTS.parent
SRC = ROOT / "src"
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
VECTORS = TESTS / "vectors"
