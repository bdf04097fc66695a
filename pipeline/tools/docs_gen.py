"""Generate the field tables of docs/recipes.md from the pydantic schema, so the docs cannot drift from the code.

    python -m pipeline.tools.docs_gen          # rewrite the generated block of docs/recipes.md
    python -m pipeline.tools.docs_gen --check  # exit 1 if docs/recipes.md is out of date (tests/test_recipes.py)

Only the text between the BEGIN/END markers is generated; the rest of the page is written by hand. Nothing runs at
import; only pydantic and the schema are imported.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline import registry, schema

BEGIN = "<!-- BEGIN GENERATED FIELD TABLES (python -m pipeline.tools.docs_gen) -->"
END = "<!-- END GENERATED FIELD TABLES -->"
DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
SECTIONS = (("Recipe header", schema.RecipeHeader), ("`defaults:`", schema.Defaults),
            ("`model:` section", schema.ModelSection), ("`lora:` section", schema.LoraSection),
            ("`data:` section", schema.DataSection), ("`train:` section", schema.TrainSection),
            ("`push_to_hub:`", schema.HubTarget), ("`rewards:` item", schema.RuleReward), ("`rollout:` section", schema.RolloutSection),
            ("`evals:` item", schema.EvalSection), ("`parallelism:`", schema.ParallelismSection))


def type_name(annotation) -> str:
    """A short readable type: `str | None`, `list[str]`, `'a' | 'b'`, section names for nested models."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a!r}`".replace("'", '"') for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"{annotation.__name__} section"
    return getattr(annotation, "__name__", str(annotation))


def default_text(info) -> str:
    """The field's default as YAML would show it, or 'required'."""
    if info.default is PydanticUndefined and info.default_factory is None:
        return "**required**"
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"' if value else '""'
    return str(value)


def constraints(info) -> str:
    """gt/ge/lt/le/min_length limits declared on the field."""
    found = []
    for item in info.metadata:
        for name, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "min length")):
            value = getattr(item, name, None)
            if value is not None:
                found.append(f"{symbol} {value}")
    return ", ".join(found)


def field_table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    """Markdown table rows for the fields of one model."""
    rows = ["| key | type | default | notes |", "| --- | --- | --- | --- |"]
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        notes = "; ".join(n for n in (info.description or "", constraints(info)) if n)
        rows.append(f"| `{name}` | {type_name(info.annotation)} | {default_text(info)} | {notes} |")
    return rows


def stage_section(kind: str, cls: type[schema.StageBase]) -> list[str]:
    """Heading, docstring, what it produces, where references are allowed, and its own fields."""
    refs = ", ".join(f"`{key}` ({' or '.join(kinds)})" for key, kinds in cls.references.items()) or "none"
    lines = [f"### `{kind}`", "", inspect.cleandoc(cls.__doc__ or ""), "",
             f"Produces a **{cls.produces}** artifact. `${{stage}}` references allowed in: {refs}.", ""]
    return lines + field_table(cls, skip=tuple(schema.StageBase.model_fields)) + [""]


def generate() -> str:
    """The whole generated block, markers included."""
    lines = [BEGIN, "", "## Field reference (generated)", "",
             "Every stage also accepts `description`, `push_to_hub`, `seed` and `report_to` (see *Fields every stage has*).", ""]
    lines += ["### Fields every stage has", ""] + field_table(schema.StageBase) + [""]
    for kind, entry in registry.STAGES.items():
        cls = entry.config
        lines += stage_section(kind, cls)
    lines += ["## Shared sections (generated)", ""]
    for title, model in SECTIONS:
        lines += [f"### {title}", "", inspect.cleandoc(model.__doc__ or ""), ""] + field_table(model) + [""]
    lines.append(END)
    return "\n".join(lines)


def splice(text: str, block: str) -> str:
    """Replace the generated block in `text` (append it if the markers are missing)."""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + block + tail
    return text.rstrip("\n") + "\n\n" + block + "\n"


def is_current(path: Path = DOC) -> bool:
    return path.exists() and splice(path.read_text(), generate()) == path.read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.docs_gen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the docs are out of date")
    parser.add_argument("--path", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if args.check:
        if is_current(args.path):
            return 0
        print(f"{args.path} is out of date: run python -m pipeline.tools.docs_gen", file=sys.stderr)
        return 1
    text = args.path.read_text() if args.path.exists() else ""
    args.path.write_text(splice(text, generate()))
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
