"""The run report: written by the runner at the end of a run and by `python -m pipeline report OUTPUT`; PNGs are
real images; every number in report.md's metrics table equals the manifests'; graph and lineage come from parents.

Run: .venv/bin/python -m pytest tests/test_report.py -q
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.tools import report
from pipeline.artifacts import read_manifest, update_manifest


@pytest.fixture
def chain(tiny_chain, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_chain.output, tmp_path / "out"))


def section(text: str, heading: str) -> list[str]:
    lines = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    return [line for line in lines if line.startswith("|")]


def parse_table(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def assert_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 3000
    image = mpimg.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.01  # not a blank canvas


def test_runner_writes_report_at_end_of_run(tiny_chain):
    assert (tiny_chain.output / "report.md").exists()
    assert (tiny_chain.output / "report.html").exists()


def test_report_files_images_and_numbers_match_manifests(chain):
    update_manifest(chain / "sft", evaluation={"perplexity": 12.345678901})
    path = report.write_report(chain)
    assert path == chain / "report.md"
    text = path.read_text()
    html = (chain / "report.html").read_text()
    manifests = {name: read_manifest(chain / name) for name in ("tokenizer", "base", "sft", "reward")}

    assert_png(chain / report.ASSETS / "stage_graph.png")
    trained = [name for name, m in manifests.items() if any("loss" in h for h in m["log_history"])]
    assert set(trained) >= {"base", "sft", "reward"}
    for name in trained:
        assert_png(chain / report.ASSETS / f"loss_{name}.png")
        assert f"{report.ASSETS}/loss_{name}.png" in text and f"{report.ASSETS}/loss_{name}.png" in html

    header, rows = parse_table(section(text, "Metrics"))
    assert header[0] == "metric" and set(header[1:]) == set(manifests)
    checked = 0
    for row in rows:
        for stage, cell in zip(header[1:], row[1:]):
            expected = report.numbers(manifests[stage]).get(row[0])
            if expected is None:
                assert cell == ""
                continue
            assert float(cell) == pytest.approx(expected, rel=1e-5), (stage, row[0])
            checked += 1
    wanted = sum(len(report.numbers(m)) for m in manifests.values())
    assert checked == wanted and checked > 10
    assert "| eval:perplexity |" in text and "12.3457" in text

    timing_header, timing_rows = parse_table(section(text, "Timings"))
    by_stage = {row[0]: float(row[2]) for row in timing_rows}
    for name, m in manifests.items():
        assert by_stage[name] == pytest.approx(m["duration_s"], rel=1e-5)
    assert by_stage["total"] == pytest.approx(sum(m["duration_s"] for m in manifests.values()), rel=1e-5)

    _, lineage_rows = parse_table(section(text, "Lineage"))
    lineage = {row[0]: row for row in lineage_rows}
    for name, m in manifests.items():
        assert lineage[name][2] == m["fingerprint"][:12]
        for parent in m["parents"]:
            assert f"{parent['stage']}@{parent['fingerprint'][:12]}" in lineage[name][3]
    assert "```mermaid" in text and "tokenizer --> base" in text and "base --> sft" in text
    assert "base --> reward" in text and "<table>" in html


def test_report_cli(chain, capsys):
    from pipeline.__main__ import main

    (chain / "report.md").unlink()
    assert main(["report", str(chain)]) == 0
    assert str(chain / "report.md") in capsys.readouterr().out
    assert (chain / "report.md").read_text().startswith("# Run report: tiny-chain")


def test_loss_series_and_depths_hand_cases():
    history = [{"loss": 2.0, "step": 1}, {"eval_loss": 1.5, "step": 1}, {"loss": 1.0, "step": 2},
               {"train_loss": 1.5, "step": 2}]
    assert report.loss_series(history) == {"loss": ([1, 2], [2.0, 1.0]), "eval_loss": ([1], [1.5])}
    fp = "0" * 64
    stages = [{"stage": "a", "parents": [], "fingerprint": fp},
              {"stage": "b", "parents": [{"stage": "a", "fingerprint": fp}], "fingerprint": fp},
              {"stage": "c", "parents": [{"stage": "a", "fingerprint": fp}, {"stage": "b", "fingerprint": fp}],
               "fingerprint": fp}]
    assert report.depths(stages) == {"a": 0, "b": 1, "c": 2}
    assert report.plot_losses({"stage": "x", "log_history": [{"step": 1}]}, Path("unused.png")) is None


def test_report_on_empty_output(tmp_path):
    path = report.write_report(tmp_path, "empty")
    assert "0 stages" in path.read_text()
    assert "stage_graph.png" not in path.read_text()


# --------------------------------------------------------------------------------- before -> after and RL curves


def fake_stage(output: Path, name: str, kind: str, metrics: dict, log_history: list[dict]) -> None:
    """A complete artifact folder holding only a manifest: what the report reads."""
    from pipeline.artifacts import write_json_atomic

    (output / name).mkdir(parents=True)
    write_json_atomic(output / name / "manifest.json", {
        "complete": True, "fingerprint": name.ljust(64, "0"), "stage": name, "kind": kind, "parents": [],
        "lineage": [], "metrics": metrics, "log_history": log_history, "duration_s": 1.0,
        "created_at": f"2025-01-01T00:00:0{len(list(output.iterdir()))}Z"})


PPO_LOG = [{"step": s, "episodes": 4 * s, "reward/mean": 0.1 * s, "kl": 0.01 * s, "policy/entropy": 2.0 - 0.1 * s,
            "response_length": 5.0 + s, "loss/policy": 0.1} for s in range(1, 6)]
GRPO_LOG = [{"step": s, "loss": 0.1, "reward": s, "kl": 0.0, "entropy": 1.0, "completions/mean_length": 7.0}
            for s in (1, 2, 3)] + [{"step": 3, "train_loss": 0.1, "reward": 9.0, "epoch": 1.0}]


@pytest.fixture
def rl_output(tmp_path) -> Path:
    fake_stage(tmp_path, "tok", "tokenizer", {"vocab_size": 300, "chars_per_token": 3.1}, [])
    fake_stage(tmp_path, "sft", "sft", {"eval_loss_before": 2.0, "eval_loss_after": 1.0, "train_rows": 10},
               [{"step": s, "loss": 3.0 / s} for s in (1, 2, 3, 4)] + [{"step": 4, "train_loss": 1.5}])
    fake_stage(tmp_path, "ppo", "ppo", {"eval_reward_before": 0.5, "eval_reward_after": 0.75, "kl": 0.02},
               PPO_LOG)
    fake_stage(tmp_path, "grpo", "grpo", {"eval_reward_before": 0.5, "eval_reward_after": 0.6}, GRPO_LOG)
    return tmp_path


def test_rl_series_and_held_out_loss_by_hand():
    ppo = report.rl_series(PPO_LOG)
    assert ppo["reward"] == ([1, 2, 3, 4, 5], [e["reward/mean"] for e in PPO_LOG])
    assert ppo["entropy"][1] == [e["policy/entropy"] for e in PPO_LOG]
    grpo = report.rl_series(GRPO_LOG)  # the trainer's closing summary entry is not a point of the curve
    assert grpo["reward"] == ([1, 2, 3], [1, 2, 3]) and grpo["response length"] == ([1, 2, 3], [7.0] * 3)
    assert report.rl_series([{"step": 1, "loss": 1.0}]) == {}
    manifest = {"metrics": {"eval_loss_before": 2.0, "eval_loss_after": 1.0}, "log_history": [{"step": 7}]}
    assert report.held_out_loss(manifest) == ([0, 7], [2.0, 1.0])
    assert report.held_out_loss({"metrics": {"eval_loss_before": 2.0}, "log_history": []}) is None


def test_report_has_rl_curves_and_before_after_charts(rl_output):
    report.write_report(rl_output)
    assets = rl_output / report.ASSETS
    text, page = (rl_output / "report.md").read_text(), (rl_output / "report.html").read_text()
    expected = {"rl_ppo.png", "rl_grpo.png", "measures_sft.png", "measures_ppo.png", "measures_grpo.png",
                "loss_sft.png", "loss_grpo.png"}
    for name in expected:
        assert_png(assets / name)
        assert f"{report.ASSETS}/{name}" in text and f"{report.ASSETS}/{name}" in page
    drawn = {p.name for p in assets.glob("*.png")} - {"stage_graph.png"}
    assert drawn == expected  # no RL curves for sft, no bars for the tokenizer (it measured nothing before)
    assert "## RL curves" in text and "## Before -> after" in text and "<h2>RL curves</h2>" in page


def chromium() -> str | None:
    """A Chromium/Chrome binary for the browser check (CHROMIUM names one explicitly)."""
    import os

    names = ("chromium", "chromium-browser", "chromium-headless-shell", "chrome-headless-shell", "headless_shell",
             "google-chrome", "google-chrome-stable")
    return os.environ.get("CHROMIUM") or next((found for n in names if (found := shutil.which(n))), None)


CHECK_IMAGES = ("<script>window.addEventListener('load', () => { const all = [...document.images]; "
                "const ok = all.filter(i => i.complete && i.naturalWidth > 0).length; "
                "document.body.setAttribute('data-images', ok + '/' + all.length); });</script>")


@pytest.mark.slow
def test_report_renders_in_a_real_browser(tiny_chain, tmp_path):
    """The HTML report of a chain with PPO and GRPO stages, opened by headless Chromium: every image loads and the
    screenshot is not blank."""
    import subprocess

    import matplotlib.image as mpimg
    import yaml

    from pipeline import recipe as recipe_lib
    from pipeline import runner
    from conftest import ROOT

    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium-headless-shell, or set CHROMIUM=/path/to/chrome)")
    out = Path(shutil.copytree(tiny_chain.output, tmp_path / "out"))
    prompts = {"path": str(ROOT / "data/prompts.jsonl"), "eval_path": str(ROOT / "data/prompts_eval.jsonl"),
               "max_rows": 32}
    spec = {**tiny_chain.spec, "output_dir": str(out)}
    spec["stages"] = {**spec["stages"], "ppo": {
        "kind": "ppo", "model": "${sft}", "reward_model": "${reward}", "data": prompts, "total_episodes": 16,
        "rollout_batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6, "eval_prompts": 4,
        "eval_samples": 1}, "grpo": {
        "kind": "grpo", "model": "${sft}", "reward_model": "${reward}", "data": prompts, "num_generations": 2,
        "max_new_tokens": 6, "eval_prompts": 4, "eval_samples": 1,
        "train": {"max_steps": 3, "batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    runner.run_recipe(recipe_lib.load_recipe(tmp_path / "recipe.yaml"))
    page = (out / "report.html").read_text()
    check = out / "browser_check.html"  # beside report.html, so the image paths resolve the same way
    check.write_text(page.replace("</body>", CHECK_IMAGES + "</body>"))
    flags = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=10000"]
    dom = subprocess.run(flags + ["--dump-dom", check.as_uri()], capture_output=True, text=True, timeout=120)
    images = page.count("<img ")
    assert images >= 10 and f'data-images="{images}/{images}"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,2400", (out / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1200)
    assert (pixels.mean(axis=2) < 0.9).mean() > 0.02 and pixels.std() > 0.05  # text and charts, not a blank page
