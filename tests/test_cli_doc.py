"""docs/cli.md is generated from the parsers; it must match them."""

from pathlib import Path

from dmimage.cli._doc import render


def test_cli_reference_is_current():
    doc = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert doc.read_text() == render(), "regenerate: python -m dmimage.cli._doc > docs/cli.md"
