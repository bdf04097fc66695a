"""Run report: OUTPUT/report.md and OUTPUT/report.html with PNGs (stage graph, each stage's loss curves), every
stage's metrics side by side, timings and lineage, built only from the artifacts' manifests.

Written at the end of `python -m pipeline run recipe.yaml` (main process), or on demand with
`python -m pipeline report OUTPUT`. Plots use matplotlib's Agg backend; nothing runs at import.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from pipeline import artifacts

ASSETS = "report_assets"


# ----------------------------------------------------------------------------------------------------- reading


def read_stages(output_dir: Path) -> list[dict[str, Any]]:
    """Manifests of the complete artifacts in `output_dir`, oldest first."""
    manifests = [m for folder in sorted(Path(output_dir).iterdir()) if folder.is_dir()
                 and not folder.name.startswith(".") and (m := artifacts.read_manifest(folder))]
    return sorted(manifests, key=lambda m: (m.get("created_at", ""), m.get("stage", "")))


def numbers(manifest: dict[str, Any]) -> dict[str, float]:
    """A stage's numeric metrics; evaluation results are prefixed `eval:`."""
    found = {k: v for k, v in (manifest.get("metrics") or {}).items() if _is_number(v)}
    found.update({f"eval:{k}": v for k, v in (manifest.get("evaluation") or {}).items() if _is_number(v)})
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value: Any) -> str:
    """How numbers appear in the report (6 significant digits)."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def edges(stages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    names = {m["stage"] for m in stages}
    return [(p["stage"], m["stage"]) for m in stages for p in m.get("parents", []) if p["stage"] in names]


# ------------------------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def depths(stages: list[dict[str, Any]]) -> dict[str, int]:
    """Longest distance from a root for each stage (its column in the graph)."""
    depth = {m["stage"]: 0 for m in stages}
    for _ in stages:
        for parent, child in edges(stages):
            depth[child] = max(depth[child], depth[parent] + 1)
    return depth


def plot_graph(stages: list[dict[str, Any]], path: Path) -> Path:
    """The stage graph as boxes (kind below the name) and arrows, left to right."""
    plt = _pyplot()
    depth = depths(stages)
    rows: dict[int, int] = {}
    where = {}
    for m in stages:
        column = depth[m["stage"]]
        where[m["stage"]] = (column, -rows.get(column, 0))
        rows[column] = rows.get(column, 0) + 1
    fig, ax = plt.subplots(figsize=(2.2 * (max(depth.values(), default=0) + 1) + 1, 1.4 * max(rows.values()) + 1))
    for parent, child in edges(stages):
        (x0, y0), (x1, y1) = where[parent], where[child]
        ax.annotate("", xy=(x1 - 0.32, y1), xytext=(x0 + 0.32, y0), arrowprops={"arrowstyle": "->"})
    for m in stages:
        x, y = where[m["stage"]]
        ax.text(x, y, f"{m['stage']}\n({m.get('kind', '')})", ha="center", va="center",
                bbox={"boxstyle": "round", "facecolor": "#e8f0fe"})
    ax.set_xlim(-0.6, max(depth.values(), default=0) + 0.6)
    ax.set_ylim(-max(rows.values()) + 0.4, 0.6)
    ax.axis("off")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_series(log_history: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """{'loss': (steps, values), 'eval_loss': ...} from a trainer's log history."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for entry in log_history:
        for key in ("loss", "eval_loss"):
            if _is_number(entry.get(key)) and _is_number(entry.get("step")):
                steps, values = series.setdefault(key, ([], []))
                steps.append(entry["step"])
                values.append(entry[key])
    return series


def plot_losses(manifest: dict[str, Any], path: Path) -> Path | None:
    """Train/eval loss against step; None when the stage logged no loss."""
    series = loss_series(manifest.get("log_history") or [])
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, (steps, values) in series.items():
        ax.plot(steps, values, marker="o" if len(steps) < 3 else None, label=key)
    ax.set_title(f"{manifest['stage']} ({manifest.get('kind', '')})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------- tables


def mermaid(stages: list[dict[str, Any]]) -> str:
    lines = ["graph LR"] + [f"  {m['stage']}[\"{m['stage']} ({m.get('kind', '')})\"]" for m in stages]
    return "\n".join(lines + [f"  {a} --> {b}" for a, b in edges(stages)])


def metrics_table(stages: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header (metric, stage...) and one row per metric name, blank where a stage lacks it."""
    per_stage = {m["stage"]: numbers(m) for m in stages}
    names = list(dict.fromkeys(k for values in per_stage.values() for k in values))
    header = ["metric"] + [m["stage"] for m in stages]
    rows = [[name] + [fmt(per_stage[m["stage"]][name]) if name in per_stage[m["stage"]] else ""
                      for m in stages] for name in names]
    return header, rows


def timing_table(stages: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    rows = [[m["stage"], m.get("kind", ""), fmt(float(m.get("duration_s", 0.0))), m.get("created_at", "")]
            for m in stages]
    total = sum(float(m.get("duration_s", 0.0)) for m in stages)
    return ["stage", "kind", "duration_s", "created_at"], rows + [["total", "", fmt(total), ""]]


def lineage_table(stages: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    rows = [[m["stage"], m.get("kind", ""), m["fingerprint"][:12],
             ", ".join(f"{p['stage']}@{p['fingerprint'][:12]}" for p in m.get("parents", [])) or "-",
             " > ".join(e["stage"] for e in m.get("lineage", [])) or "-"] for m in stages]
    return ["stage", "kind", "fingerprint", "parents", "ancestors"], rows


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows]


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------------------------------- writing


def _sections(stages, graph: Path, curves: dict[str, Path]) -> list[tuple[str, Any]]:
    return [("Stage graph", ("graph", graph)), ("Metrics", metrics_table(stages)),
            ("Loss curves", ("curves", curves)), ("Timings", timing_table(stages)),
            ("Lineage", lineage_table(stages))]


def _markdown(title: str, stages, sections) -> str:
    lines = [f"# {title}", "", f"{len(stages)} stages.", ""]
    for heading, content in sections:
        lines += [f"## {heading}", ""]
        if content[0] == "graph":
            lines += ["```mermaid", mermaid(stages), "```", ""]
            lines += [f"![stage graph]({ASSETS}/{content[1].name})", ""] if content[1].exists() else []
        elif content[0] == "curves":
            lines += [f"![{s} loss]({ASSETS}/{p.name})" for s, p in content[1].items()] or ["No loss logged."]
            lines += [""]
        else:
            lines += md_table(*content) + [""]
    return "\n".join(lines)


def _html(title: str, stages, sections) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if content[0] == "graph":
            if content[1].exists():
                parts.append(f"<img src='{ASSETS}/{content[1].name}' alt='stage graph'>")
            parts.append(f"<pre class='mermaid'>{html.escape(mermaid(stages))}</pre>")
        elif content[0] == "curves":
            parts += [f"<img src='{ASSETS}/{p.name}' alt='{html.escape(s)} loss'>" for s, p in content[1].items()]
        else:
            parts.append(html_table(*content))
    return "".join(parts) + "</body></html>"


def write_report(output_dir: str | Path, recipe_name: str | None = None) -> Path:
    """Write OUTPUT/report.md, OUTPUT/report.html and OUTPUT/report_assets/*.png; return report.md's path."""
    output_dir = Path(output_dir)
    stages = read_stages(output_dir)
    assets = output_dir / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    name = recipe_name or next((m.get("recipe") for m in stages if m.get("recipe")), output_dir.name)
    graph = assets / "stage_graph.png"
    graph.unlink(missing_ok=True)
    if stages:
        plot_graph(stages, graph)
    curves = {m["stage"]: p for m in stages if (p := plot_losses(m, assets / f"loss_{m['stage']}.png"))}
    sections = _sections(stages, graph, curves)
    title = f"Run report: {name}"
    (output_dir / "report.html").write_text(_html(title, stages, sections))
    report = output_dir / "report.md"
    report.write_text(_markdown(title, stages, sections))
    return report


def main(args) -> int:
    """`python -m pipeline report OUTPUT`."""
    print(write_report(args.output_dir))
    return 0
