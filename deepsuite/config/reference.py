"""Generate the config reference (docs/config_reference.md) from the schema's field docstrings.

`python -m deepsuite.config.reference > docs/config_reference.md` regenerates it; a test fails when
a field lacks a docstring or the committed file is stale.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from deepsuite.config.docs import field_docs
from deepsuite.config.families import MODEL_FAMILIES
from deepsuite.config.schema import SECTIONS


def _type_text(tp: Any) -> str:
    text = str(tp) if not isinstance(tp, type) else tp.__name__
    return text.replace("typing.", "").replace("'", '"')


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return "`" + repr(value).replace("|", "\\|") + "`"


def missing_docs() -> list[str]:
    """Fields of the schema and of every model family's args without a docstring."""
    missing = []
    classes = [(name, cls) for name, cls in SECTIONS.items()]
    classes += [(f"model ({name})", family.args_cls) for name, family in MODEL_FAMILIES.items()]
    for label, cls in classes:
        docs = field_docs(cls)
        missing += [f"{label}.{f.name}" for f in dataclasses.fields(cls) if not docs.get(f.name)]
    return missing


def _table(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        doc = docs.get(f.name, "").replace("\n", " ").replace("|", "\\|")
        lines.append(f"| `{prefix}{f.name}` | `{_type_text(hints[f.name])}` | {_default_text(f)} | {doc} |")
    return lines


def render() -> str:
    """The whole reference as Markdown."""
    out = [
        "# Configuration reference",
        "",
        "Generated from the schema's field docstrings by `python -m deepsuite.config.reference`;",
        "do not edit by hand (a test checks it is current). A YAML file holds values only; CLI",
        "`section.key=value` overrides win over the file, the file over these defaults. Unknown",
        "keys, wrong types and inconsistent values are errors naming the key.",
        "",
    ]
    for name, cls in SECTIONS.items():
        out += [f"## `{name}`", "", (cls.__doc__ or "").strip(), ""]
        out += _table(cls, f"{name}.", skip=("args",) if name == "model" else ())
        out.append("")
    for name, family in MODEL_FAMILIES.items():
        out += [
            f"## `model` fields of `{name}`",
            "",
            f"Set with `model.name: {name}`; defaults come from the chosen flavor "
            f"({', '.join(f'`{k}`' for k in family.flavors)}), the table shows the dataclass defaults.",
            "",
        ]
        out += _table(family.args_cls, "model.")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
