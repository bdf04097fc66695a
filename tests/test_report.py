"""The run report: written by the runner at the end of a run and by `python -m pipeline report OUTPUT`; PNGs are
real images; every number in report.md's metrics table equals the manifests'; graph and lineage come from parents.

Run: .venv/bin/python -m pytest tests/test_report.py -q
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline import report
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
