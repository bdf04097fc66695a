"""Load a YAML recipe: strict schema, dotted command-line overrides, `${stage}` references and stage ordering.

`load_recipe(path, overrides)` returns a `Recipe` whose stages are validated config objects in run order, or raises
`RecipeError` naming the file, the line, the key path and the fix. Recipes are data: YAML is read with the safe
loader, so no tag can construct objects or run code. Used by `python -m pipeline run|validate|show`.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline import models, registry, schema
from pipeline.data import looks_local
from pipeline.errors import RecipeError



@dataclass
class Recipe:
    """A validated recipe: header fields, stages in run order, and where each key came from."""

    path: Path
    header: schema.RecipeHeader
    stages: dict[str, schema.StageBase]  # in topological (run) order
    parents: dict[str, list[str]]  # stage -> stages it references
    raw: dict[str, Any]
    lines: dict[tuple, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.header.name

    @property
    def output_dir(self) -> Path:
        return Path(self.header.output_dir or f"outputs/{self.header.name}")

    def stage_seed(self, name: str) -> int:
        own = self.stages[name].seed
        return self.header.seed if own is None else own


# ----------------------------------------------------------------------------------------------------------- YAML


def _line_map(node: yaml.Node, prefix: tuple = (), out: dict | None = None, file: str = "") -> dict[tuple, int]:
    """Map every key path in the YAML document to its 1-based line, rejecting duplicate keys."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            path = prefix + (key,)
            if key in seen:
                raise RecipeError("duplicate key", file=file, line=key_node.start_mark.line + 1,
                                  key=_dotted(path), fix="keep one of the two entries")
            seen.add(key)
            out[path] = key_node.start_mark.line + 1
            _line_map(value_node, path, out, file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[prefix + (index,)] = item.start_mark.line + 1
            _line_map(item, prefix + (index,), out, file)
    return out


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """Parse a recipe file with the safe loader; return the data and its line map."""
    if not path.exists():
        raise RecipeError("recipe file not found", file=str(path), fix="check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError("recipe is not valid UTF-8", file=str(path), fix="save the file as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        fix = ("recipes are plain data: remove the '!' tag (the safe loader never builds objects or runs code)"
               if "constructor for the tag" in problem else "fix the YAML syntax (indentation, quotes, colons)")
        raise RecipeError(f"invalid YAML: {problem}", file=str(path), line=mark.line + 1 if mark else None,
                          fix=fix) from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping with `name:` and `stages:`", file=str(path),
                          fix="see recipes/quickstart.yaml for the format")
    return data, _line_map(node, file=str(path)) if node is not None else {}


# ------------------------------------------------------------------------------------------------------ overrides


def apply_overrides(data: dict[str, Any], overrides: list[str], file: str) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a copy of the recipe data."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not KEY=VALUE", file=file, key="command line",
                              fix="write e.g. stages.sft.train.learning_rate=1e-4")
        dotted, _, text = item.partition("=")
        keys = [k for k in dotted.strip().split(".")]
        if not all(keys):
            raise RecipeError(f"override key '{dotted}' has an empty part", file=file, key="command line",
                              fix="write e.g. stages.sft.train.learning_rate=1e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key) if isinstance(node, dict) else None
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override '{dotted}': '{'.'.join(keys[:depth + 1])}' is not a section",
                                  file=file, key="command line", fix="override a key inside a mapping")
            node = child
        node[keys[-1]] = value
    return data


# -------------------------------------------------------------------------------------------------------- errors


def _dotted(path: tuple | list) -> str:
    return ".".join(str(p) for p in path)


def _line_for(lines: dict[tuple, int], path: tuple) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` inside `model` (following nested models), for did-you-mean hints."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        info = current.model_fields.get(part)
        if info is None:
            return []
        current = _inner_model(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _validation_error(exc: ValidationError, model: type[BaseModel], prefix: tuple, file: str,
                      lines: dict[tuple, int]) -> RecipeError:
    """Turn the first pydantic error into one line with key path, line and a fix."""
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # pydantic appends the tagged-union member name for `str | None` etc.; drop type names from the path
    loc = tuple(p for p in loc if p not in ("str", "int", "float", "bool", "list[str]", "dict[str,any]"))
    path = prefix + loc
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    fix = None
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        msg = "unknown key"
        fix = f"did you mean '{close[0]}'?" if close else (
            f"allowed keys here: {', '.join(allowed)}" if allowed else "remove it")
    elif kind == "missing":
        msg = "required key is missing"
        fix = f"add `{loc[-1]}:`" if loc else "add it"
    elif kind.endswith("_type") or kind.endswith("_parsing") or kind in ("literal_error", "enum"):
        got = err.get("input")
        msg = f"{msg}, got {got!r}" if not isinstance(got, (dict, list)) else msg
        fix = "change the value to the expected type"
    else:
        fix = "change the value"
    return RecipeError(msg, file=file, line=_line_for(lines, path), key=_dotted(path), fix=fix)


# ----------------------------------------------------------------------------------------------------- references


def _find_refs(value: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """Every `${name}` string inside a stage's raw data, with its key path."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _find_refs(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _find_refs(item, path + (index,))
    elif isinstance(value, str) and "${" in value:
        found.append((path, value))
    return found


def _ref_key(path: tuple) -> str:
    """Key path without list indices; `model` shorthand counts as `model.path`."""
    keys = [str(p) for p in path if not isinstance(p, int)]
    if keys == ["model"]:
        keys = ["model", "path"]
    return ".".join(keys)


def _check_references(name: str, raw: dict, config: schema.StageBase, stages: dict[str, schema.StageBase],
                      file: str, lines: dict[tuple, int]) -> list[str]:
    parents: list[str] = []
    for path, text in _find_refs(raw):
        full = ("stages", name) + path
        line = _line_for(lines, full)
        match = schema.REF_PATTERN.match(text)
        if not match:
            raise RecipeError(f"'{text}' is not a reference", file=file, line=line, key=_dotted(full),
                              fix="a reference is the whole value, e.g. ${sft}")
        target = match.group(1)
        if target not in stages:
            close = difflib.get_close_matches(target, list(stages), n=1)
            raise RecipeError(f"reference to unknown stage '{target}'", file=file, line=line, key=_dotted(full),
                              fix=f"did you mean ${{{close[0]}}}?" if close else
                              f"define a stage named '{target}' or use one of: {', '.join(stages)}")
        if target == name:
            raise RecipeError("a stage cannot reference itself", file=file, line=line, key=_dotted(full),
                              fix="reference an earlier stage")
        accepted = type(config).references.get(_ref_key(path))
        if accepted is None:
            raise RecipeError("references are not allowed here", file=file, line=line, key=_dotted(full),
                              fix=f"use ${{stage}} only in: {', '.join(type(config).references) or 'no key'}")
        produced = stages[target].produced_kind()
        if produced not in accepted:
            raise RecipeError(f"'{target}' produces a {produced} artifact, this key needs a {' or '.join(accepted)}",
                              file=file, line=line, key=_dotted(full), fix="reference a stage of the right kind")
        if target not in parents:
            parents.append(target)
    return parents


def _topological_order(parents: dict[str, list[str]], file: str, lines: dict[tuple, int]) -> list[str]:
    """Order stages so each runs after what it references (ties keep recipe order); reject cycles."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycle = trail[trail.index(node):] + [node]
            raise RecipeError(f"stages reference each other in a cycle: {' -> '.join(cycle)}", file=file,
                              line=lines.get(("stages", node)), key=f"stages.{node}",
                              fix="remove one of the references so the stages form a chain")
        state[node] = 1
        for parent in parents[node]:
            visit(parent, trail + [node])
        state[node] = 2
        order.append(node)

    for node in parents:
        visit(node, [])
    return order


# ---------------------------------------------------------------------------------------------------- file checks


def _check_files(name: str, config: schema.StageBase, file: str, lines: dict[tuple, int]) -> None:
    """Local files named by the stage must exist; model folders must hold a config."""
    checks: list[tuple[tuple, str]] = []
    for section in ("data",):
        data = getattr(config, section, None)
        if isinstance(data, schema.DataSection):
            checks.append(((section, "path"), data.path))
            if data.eval_path:
                checks.append(((section, "eval_path"), data.eval_path))
    for index, ev in enumerate(getattr(config, "evals", []) or []):
        if ev.data is not None:
            checks.append((("evals", index, "data", "path"), ev.data.path))
        if ev.include_path:
            checks.append((("evals", index, "include_path"), ev.include_path))
    model = getattr(config, "model", None)
    if isinstance(model, schema.ModelSection) and model.path and not schema.REF_PATTERN.match(model.path):
        if looks_local(model.path) and not Path(model.path).expanduser().exists():
            checks.append((("model", "path"), model.path))
    tok = getattr(config, "tokenizer", None)
    if isinstance(tok, str) and not schema.REF_PATTERN.match(tok) and looks_local(tok):
        checks.append((("tokenizer",), tok))
    for path, value in checks:
        if schema.REF_PATTERN.match(value):
            continue
        if looks_local(value) and not Path(value).expanduser().exists():
            full = ("stages", name) + path
            raise RecipeError(f"file not found: {value}", file=file, line=_line_for(lines, full),
                              key=_dotted(full), fix="fix the path (relative paths are read from the current "
                              "directory) or use a Hub id")


# ---------------------------------------------------------------------------------------------------------- entry


def _merge_defaults(stage_raw: dict, defaults: schema.Defaults, config_cls: type[schema.StageBase]) -> dict:
    merged = copy.deepcopy(stage_raw)
    fields = config_cls.model_fields
    if defaults.train and "train" in fields:
        merged["train"] = {**defaults.train, **(merged.get("train") or {})}
    if defaults.lora is not None and "lora" in fields and "lora" in merged and merged["lora"] is not None:
        merged["lora"] = {**defaults.lora, **merged["lora"]}
    return merged


def _check_kind_traits(name: str, config: schema.StageBase, file: str, lines: dict[tuple, int]) -> None:
    """Settings that only some kinds take, by their `registry.StageKind` traits: `train.group_by_length` and
    `data.skip_rows` where the trainer pads batches of rows (and reads them in the order the stage gives)."""
    train = getattr(config, "train", None)
    if isinstance(train, schema.TrainSection) and train.group_by_length \
            and not registry.traits(config.kind).length_grouping:
        path = ("stages", name, "train", "group_by_length")
        raise RecipeError(f"`train.group_by_length` applies to {', '.join(registry.length_grouped_kinds())} stages",
                          file=file, line=_line_for(lines, path), key=_dotted(path),
                          fix=f"remove it from this {config.kind} stage (set it on those stages, not in defaults)")
    data = getattr(config, "data", None)
    if isinstance(data, schema.DataSection) and data.skip_rows and not registry.traits(config.kind).length_grouping:
        path = ("stages", name, "data", "skip_rows")
        raise RecipeError(f"`data.skip_rows` applies to {', '.join(registry.length_grouped_kinds())} stages (the "
                          "ones whose training order is known)", file=file, line=_line_for(lines, path),
                          key=_dotted(path), fix=f"remove it from this {config.kind} stage")


def _check_quantize(name: str, config: schema.StageBase, file: str, lines: dict[tuple, int]) -> None:
    """`lora.quantize` (QLoRA) only on the kinds whose trainer takes a quantized base (`registry.StageKind.qlora`)
    and on a machine that can load one (a CUDA GPU and bitsandbytes: `models.quantize_problem`), before anything
    loads."""
    lora = getattr(config, "lora", None)
    if not isinstance(lora, schema.LoraSection) or lora.quantize is None:
        return
    path = ("stages", name, "lora", "quantize")
    if not registry.traits(config.kind).qlora:
        problem = (f"`lora.quantize` applies to {', '.join(registry.qlora_kinds())} stages, not {config.kind}",
                   f"remove it from this {config.kind} stage (plain LoRA works here)")
    else:
        problem = models.quantize_problem(lora, getattr(config, "model", None))
    if problem is not None:
        raise RecipeError(problem[0], file=file, line=_line_for(lines, path), key=_dotted(path), fix=problem[1])


def parse_recipe(data: dict[str, Any], path: Path, lines: dict[tuple, int] | None = None) -> Recipe:
    """Validate already-loaded recipe data."""
    file, lines = str(path), lines or {}
    for name, raw in (data.get("stages") or {}).items() if isinstance(data.get("stages"), dict) else ():
        if not isinstance(raw, dict):
            raise RecipeError("a stage must be a mapping with `kind:`", file=file,
                              line=_line_for(lines, ("stages", name)), key=f"stages.{name}", fix="e.g. `kind: sft`")
    try:
        header = schema.RecipeHeader.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, schema.RecipeHeader, (), file, lines) from None
    if header.defaults.train:
        try:
            schema.TrainSection.model_validate(header.defaults.train)
        except ValidationError as exc:
            raise _validation_error(exc, schema.TrainSection, ("defaults", "train"), file, lines) from None

    stages: dict[str, schema.StageBase] = {}
    for name, raw in header.stages.items():
        prefix = ("stages", name)
        if not isinstance(raw, dict):
            raise RecipeError("a stage must be a mapping with `kind:`", file=file, line=_line_for(lines, prefix),
                              key=_dotted(prefix), fix="e.g. `kind: sft`")
        kind = raw.get("kind")
        config_cls = registry.config_class(kind) if isinstance(kind, str) else None
        if config_cls is None:
            close = difflib.get_close_matches(str(kind), list(registry.STAGES), n=1)
            raise RecipeError(f"unknown stage kind {kind!r}" if kind is not None else "stage has no `kind:`",
                              file=file, line=_line_for(lines, prefix + ("kind",)), key=_dotted(prefix + ("kind",)),
                              fix=f"did you mean '{close[0]}'?" if close else
                              f"use one of: {', '.join(registry.STAGES)}")
        try:
            stages[name] = config_cls.model_validate(_merge_defaults(raw, header.defaults, config_cls))
        except ValidationError as exc:
            raise _validation_error(exc, config_cls, prefix, file, lines) from None
        _check_kind_traits(name, stages[name], file, lines)
        _check_quantize(name, stages[name], file, lines)

    parents = {name: _check_references(name, header.stages[name], cfg, stages, file, lines)
               for name, cfg in stages.items()}
    order = _topological_order(parents, file, lines)
    for name in order:
        _check_files(name, stages[name], file, lines)
    return Recipe(path=path, header=header, stages={n: stages[n] for n in order}, parents=parents,
                  raw=data, lines=lines)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    data, lines = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides, str(path))
    return parse_recipe(data, path, lines)


def resolve_ref(value: str | None, recipe: Recipe) -> str | None:
    """`${stage}` -> that stage's artifact folder; anything else unchanged."""
    if value is None:
        return None
    match = schema.REF_PATTERN.match(value)
    return str(recipe.output_dir / match.group(1)) if match else value
