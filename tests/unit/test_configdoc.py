"""The configuration reference is generated from the schema and must be current."""

from pathlib import Path

from stoqd.config import SCHEMA
from stoqd.configdoc import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_reference_is_current() -> None:
    assert DOC.read_text() == render(), "run: python -m stoqd.configdoc > docs/configuration.md"


def test_every_key_is_documented_with_its_default() -> None:
    text = DOC.read_text()
    for setting in SCHEMA:
        assert f"| `{setting.key}` |" in text
        assert setting.help in text
