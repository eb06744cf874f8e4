"""The generated config reference is complete and current."""

from pathlib import Path

from deepsuite.config.reference import missing_docs, render

ROOT = Path(__file__).resolve().parents[2]


def test_every_schema_field_has_a_docstring():
    assert missing_docs() == []


def test_committed_reference_is_current():
    committed = (ROOT / "docs" / "config_reference.md").read_text(encoding="utf-8")
    assert committed == render(), (
        "docs/config_reference.md is stale: run `python -m deepsuite.config.reference > docs/config_reference.md`"
    )


def test_reference_names_every_section():
    text = render()
    for section in (
        "model",
        "data",
        "optim",
        "schedule",
        "training",
        "parallel",
        "fp8",
        "checkpoint",
        "logging",
    ):
        assert f"## `{section}`" in text
