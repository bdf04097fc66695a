"""Run report: OUTPUT/report.md and OUTPUT/report.html with PNGs (stage graph; each stage's held-out measures before
-> after as a bar chart; train loss with the held-out loss before and after on one plot; reward, KL, entropy and
response length of the RL stages), every stage's metrics side by side, which reward model judged each win rate,
timings and lineage, built only from the artifacts' manifests (`metrics`, `judges`, `log_history`).

Written at the end of `python -m pipeline run recipe.yaml` (main process), or on demand with
`python -m pipeline report OUTPUT`. Plots use matplotlib's Agg backend; nothing runs at import.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from pipeline import artifacts, registry
from pipeline.eval import summary

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


def held_out_loss(manifest: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """The held-out loss before training (step 0) and after it (the last logged step), from the stage's metrics
    (`eval_loss_before`, `eval_loss_after`: pretrain and sft); None when the stage has not both."""
    metrics = manifest.get("metrics") or {}
    before, after = metrics.get("eval_loss_before"), metrics.get("eval_loss_after")
    if not (_is_number(before) and _is_number(after)):
        return None
    steps = [e["step"] for e in manifest.get("log_history") or [] if _is_number(e.get("step"))]
    return [0, max(steps, default=1)], [before, after]


def plot_losses(manifest: dict[str, Any], path: Path) -> Path | None:
    """Train loss against step, with the held-out loss before and after training on the same axes; None when the
    stage logged no loss."""
    series = loss_series(manifest.get("log_history") or [])
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, (steps, values) in series.items():
        ax.plot(steps, values, marker="o" if len(steps) < 3 else None, label=key)
    held_out = held_out_loss(manifest)
    if held_out is not None:
        ax.plot(*held_out, "s--", label="held-out loss (before, after)")
    ax.set_title(f"{manifest['stage']} ({manifest.get('kind', '')})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# panel -> log keys that hold it (our PPO's first, then TRL's GRPO/RLOO)
RL_PANELS = (("reward", ("reward/mean", "reward")), ("KL", ("kl",)), ("entropy", ("policy/entropy", "entropy")),
             ("response length", ("response_length", "completions/mean_length")))


def rl_series(log_history: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """{'reward': (steps, values), 'KL': ..., 'entropy': ..., 'response length': ...} of an RL stage's training log
    (the trainer's closing summary entry, holding `train_loss`, left out); panels without data are absent."""
    entries = [e for e in log_history if _is_number(e.get("step")) and "train_loss" not in e]
    series = {}
    for panel, keys in RL_PANELS:
        key = next((k for k in keys if any(_is_number(e.get(k)) for e in entries)), None)
        if key is not None:
            picked = [e for e in entries if _is_number(e.get(key))]
            series[panel] = ([e["step"] for e in picked], [e[key] for e in picked])
    return series


def plot_rl(manifest: dict[str, Any], path: Path) -> Path | None:
    """Reward, KL, entropy and response length against step in a 2x2 grid; None unless an RL stage logged them."""
    series = rl_series(manifest.get("log_history") or []) if registry.traits(str(manifest.get("kind"))).samples_episodes else {}
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.5), squeeze=False)
    for ax, (panel, _) in zip(axes.flat, RL_PANELS):
        if panel not in series:
            ax.set_visible(False)
            continue
        steps, values = series[panel]
        ax.plot(steps, values, marker="o" if len(steps) < 3 else None)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{manifest['stage']} ({manifest.get('kind', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_measures(manifest: dict[str, Any], path: Path) -> Path | None:
    """Each held-out measure before -> after as a pair of bars (one small chart per measure, since their scales
    differ); None when the stage has no before/after pair."""
    pairs = summary.before_after(manifest.get("metrics") or {})
    if not pairs:
        return None
    plt = _pyplot()
    columns = min(4, len(pairs))
    rows = math.ceil(len(pairs) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(pairs):]:
        ax.set_visible(False)
    for ax, (name, before, after) in zip(axes.flat, pairs):
        bars = ax.bar(["before", "after"], [before, after], color=["#9aa5b1", "#2f6fdb"])
        ax.bar_label(bars, labels=[f"{before:.4g}", f"{after:.4g}"], fontsize=8)
        ax.set_title(name.removeprefix("eval_"), fontsize=9)
        ax.axhline(0, color="#444", linewidth=0.6)
        ax.margins(y=0.2)
        if before == after == 0:
            ax.set_ylim(-1, 1)
    fig.suptitle(f"{manifest['stage']} ({manifest.get('kind', '')}): held-out before -> after", fontsize=10)
    fig.tight_layout()
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


def judges_table(stages: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per win rate of an `evaluate` stage: the policy, the value, the judge and whether the policy was
    trained against that judge (its own reward model) or not (an independent judge)."""
    rows = [[m["stage"], Path(m.get("evaluated") or "").name, key,
             fmt((m.get("metrics") or {}).get(key, "")), Path(str(judge.get("path"))).name,
             "yes" if judge.get("is_policy_reward_model") else "no (independent)"]
            for m in stages for key, judge in (m.get("judges") or {}).items()]
    return ["stage", "policy", "win rate", "value", "judge", "policy trained against it"], rows


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


def _sections(stages, graph: Path, images: dict[str, list[tuple[str, Path]]]) -> list[tuple[str, Any]]:
    judges = judges_table(stages)
    return [("Stage graph", ("graph", graph)), ("Metrics", metrics_table(stages)),
            *([("Win-rate judges", judges)] if judges[1] else []),
            ("Before -> after", ("images", images["measures"], "No held-out measures before and after.")),
            ("Loss curves", ("images", images["loss"], "No loss logged.")),
            ("RL curves", ("images", images["rl"], "No RL stage.")),
            ("Timings", timing_table(stages)), ("Lineage", lineage_table(stages))]


def _markdown(title: str, stages, sections) -> str:
    lines = [f"# {title}", "", f"{len(stages)} stages.", ""]
    for heading, content in sections:
        lines += [f"## {heading}", ""]
        if content[0] == "graph":
            lines += ["```mermaid", mermaid(stages), "```", ""]
            lines += [f"![stage graph]({ASSETS}/{content[1].name})", ""] if content[1].exists() else []
        elif content[0] == "images":
            lines += [f"![{alt}]({ASSETS}/{p.name})" for alt, p in content[1]] or [content[2]]
            lines += [""]
        else:
            lines += md_table(*content) + [""]
    return "\n".join(lines)


def _html(title: str, stages, sections) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if content[0] == "graph":
            if content[1].exists():
                parts.append(f"<img src='{ASSETS}/{content[1].name}' alt='stage graph'>")
            parts.append(f"<pre class='mermaid'>{html.escape(mermaid(stages))}</pre>")
        elif content[0] == "images":
            parts += [f"<img src='{ASSETS}/{p.name}' alt='{html.escape(alt)}'>" for alt, p in content[1]] or [
                f"<p>{html.escape(content[2])}</p>"]
        else:
            parts.append(html_table(*content))
    return "".join(parts) + "</body></html>"


def _plots(stages, assets: Path) -> dict[str, list[tuple[str, Path]]]:
    """Each stage's charts, by section: (alt text, PNG)."""
    images: dict[str, list[tuple[str, Path]]] = {"measures": [], "loss": [], "rl": []}
    for m in stages:
        name = m["stage"]
        for section, alt, plot, stem in (("measures", "before -> after", plot_measures, "measures"),
                                         ("loss", "loss", plot_losses, "loss"), ("rl", "RL curves", plot_rl, "rl")):
            path = plot(m, assets / f"{stem}_{name}.png")
            if path is not None:
                images[section].append((f"{name} {alt}", path))
    return images


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
    sections = _sections(stages, graph, _plots(stages, assets))
    title = f"Run report: {name}"
    (output_dir / "report.html").write_text(_html(title, stages, sections))
    report = output_dir / "report.md"
    report.write_text(_markdown(title, stages, sections))
    return report
