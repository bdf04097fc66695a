"""What a person sees during `python -m pipeline run`: per stage one header line, plain progress lines (output is a
pipe here, so no bar redraws) and one summary line with the before -> after measures; library chatter (trainer log
dicts, warnings, load reports, library loggers, progress bars) only in the stage's train.log, or also on the terminal
with -v; a crash is one line naming the log that holds its traceback. Plus the pieces: the progress display, the
capture (which puts everything back, also on error) and the before/after pairing.

Run: .venv/bin/python -m pytest tests/test_console.py -q    (tiny CLI runs in subprocesses, ~30 s)
"""
from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import ROOT, tiny_chain_spec
from pipeline.eval import summary as measures
from pipeline.artifacts import read_manifest
from pipeline.console import Console, capture
from resilience_common import env, tiny_recipe, write_recipe

# Runs the CLI with probes inside a stage: what a library would print, warn and log there.
PROBE = '''
import logging, sys, warnings
from pipeline import __main__ as cli
from pipeline.stages import {stage} as probed

original = probed.run


def run(ctx):
    print({{"probe_loss": 1.0}})
    warnings.warn("probe warning from a library", FutureWarning)
    logging.getLogger("transformers").warning("probe transformers logger")
    sys.stderr.write("probe stderr bar 50%|#####     | 1/2\\r")
    if {crash}:
        raise RuntimeError("probe crash\\nsecond line")
    return original(ctx)


probed.run = run
sys.exit(cli.main(sys.argv[1:]))
'''
WARNING_LINE = re.compile(r"\b\w*Warning\b|^WARNING|LOAD REPORT")


def run_probed(tmp_path: Path, recipe: Path, *args: str, stage: str = "sft", crash: bool = False):
    script = tmp_path / "probed_cli.py"
    script.write_text(PROBE.format(stage=stage, crash=crash))
    return subprocess.run([sys.executable, str(script), "run", str(recipe), *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)


def chatter(lines: list[str]) -> list[str]:
    """Lines a person should not see: raw log dicts, warnings, load reports, probes, progress-bar redraws."""
    return [line for line in lines if "{'" in line or '{"' in line or WARNING_LINE.search(line) or "probe" in line
            or "\r" in line or "%|" in line]


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    """tokenizer -> base -> sft -> reward through the CLI, stdout/stderr piped, probes in the sft stage."""
    tmp = tmp_path_factory.mktemp("console")
    recipe = write_recipe(tmp, tiny_chain_spec(tmp / "out"))
    result = run_probed(tmp, recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "out", recipe, result


def test_console_has_one_header_progress_and_summary_per_stage_and_no_chatter(chain_run):
    out, _, result = chain_run
    lines = (result.stdout + result.stderr).splitlines()
    assert chatter(lines) == [], "\n".join(chatter(lines))
    assert result.stderr.strip() == ""
    spec = tiny_chain_spec(out)
    for index, (name, stage) in enumerate(spec["stages"].items(), start=1):
        manifest = read_manifest(out / name)
        assert lines.count(f"[{index}/4] {name} ({stage['kind']}): running") == 1
        summary = [line for line in lines if line.startswith(f"[{index}/4] {name}: done in ")]
        assert len(summary) == 1
        for stem, before, after in measures.before_after(manifest["metrics"]):
            assert f"{stem} {before:.4g} -> {after:.4g}" in summary[0]
        if name == "tokenizer":
            continue
        progress = [line for line in lines if line.startswith(f"  {name} ")]
        steps = [int(re.match(rf"  {name} (\d+)/4", line).group(1)) for line in progress]
        assert steps == sorted(set(steps)) and steps[-1] == 4  # plain lines, each step once, up to the end
        last_logged = [e for e in manifest["log_history"] if "loss" in e][-1]
        assert f"loss {last_logged['loss']:.4g}" in progress[-1] and "lr " in progress[-1]


def test_train_log_in_each_artifact_holds_the_library_output(chain_run):
    out, _, _ = chain_run
    sft = (out / "sft" / "train.log").read_text()
    for probe in ("{'probe_loss': 1.0}", "FutureWarning: probe warning from a library",
                  "probe transformers logger", "probe stderr bar"):
        assert probe in sft
    for name in ("base", "sft", "reward"):
        log = (out / name / "train.log").read_text()
        assert "{'loss': " in log and "'learning_rate': " in log  # the trainer's raw log dicts
        assert "probe" not in log or name == "sft"  # each stage's output stays in its own log
    assert "LOAD REPORT" in (out / "reward" / "train.log").read_text()  # base loaded as a sequence classifier
    assert not list(out.glob(".work/*"))  # the logs moved into the artifacts with them


def test_train_log_changes_no_fingerprint_rerun_skips_everything(chain_run):
    out, recipe, _ = chain_run
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe)], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("up to date, skipped") == 4 and "running" not in result.stdout


def test_crash_is_one_line_naming_the_log_with_the_traceback(tmp_path):
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, stages=("tokenizer", "base")))
    result = run_probed(tmp_path, recipe, stage="pretrain", crash=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: RuntimeError: probe crash"), errors
    log = Path(re.search(r"traceback in (\S+);", errors[0]).group(1))
    assert log.name == "train.log" and log.parent.parent.name == ".work"
    text = log.read_text()
    assert "Traceback" in text and "RuntimeError: probe crash" in text and "probe warning" in text

    verbose = run_probed(tmp_path, recipe, "-v", stage="pretrain", crash=True)
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and "probe warning from a library" in verbose.stderr
    assert "{'probe_loss': 1.0}" in verbose.stdout


def test_verbose_shows_library_output_and_still_logs_it(tmp_path):
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, steps=2, stages=("tokenizer", "base")))
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe), "-v"], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "{'loss': " in result.stdout and "library output:" not in result.stdout
    assert "{'loss': " in (tmp_path / "out" / "base" / "train.log").read_text()


# ------------------------------------------------------------------------------------------------------ pieces


def test_plain_progress_prints_a_line_per_tenth_with_the_latest_figures():
    stream = io.StringIO()
    console = Console(stream=stream, interactive=False)
    display = console.progress(100, "sft", episodes_per_step=4)
    for step in range(1, 101):
        display.update(step)
        display.update(step, {"loss": 1.0 / step})
    display.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [f"{s}/100" for s in range(10, 101, 10)]
    assert lines[0].startswith("  sft 10/100  loss 0.1  episodes/s ")  # the figures of the step it reports
    assert "\r" not in stream.getvalue()


def test_plain_progress_names_the_step_of_figures_logged_before_the_line():
    stream = io.StringIO()
    display = Console(stream=stream, interactive=False).progress(20, "sft")
    for step in range(1, 21):
        display.update(step, {"loss": 1.0 / step} if step % 5 == 0 else None)
    display.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "  sft 2/20"  # nothing logged yet: no figures, no note
    assert lines[2] == "  sft 6/20  loss 0.2  (figures of step 5)"
    assert lines[4] == "  sft 10/20  loss 0.1"  # figures of the step it reports: no note
    assert lines[-1] == "  sft 20/20  loss 0.05"


def test_interactive_progress_redraws_one_bar_and_a_disabled_console_shows_nothing():
    stream = io.StringIO()
    display = Console(stream=stream, interactive=True).progress(5, "ppo")
    for step in range(1, 6):
        display.update(step, {"reward": float(step)})
    display.close()
    assert "\r" in stream.getvalue() and "reward 5" in stream.getvalue() and "5/5" in stream.getvalue()
    silent = io.StringIO()
    display = Console(stream=silent, interactive=False, enabled=False).progress(5, "ppo")
    for step in range(1, 6):
        display.update(step, {"reward": 1.0})
    display.close()
    assert silent.getvalue() == ""


def test_capture_puts_everything_back_also_on_error(tmp_path):
    library = logging.getLogger("probe.library")
    handler = logging.StreamHandler(sys.stderr)
    library.addHandler(handler)
    try:
        before = (sys.stdout, sys.stderr, handler.stream, list(logging.getLogger("pipeline").handlers),
                  list(warnings.filters), warnings.showwarning)
        console = Console(stream=io.StringIO())
        with pytest.raises(RuntimeError, match="boom") as raised:
            with capture(tmp_path / "train.log", console):
                print({"loss": 1.0})
                warnings.warn("probe warning")
                library.warning("library says")
                console.progress(10, "sft").update(1)
                raise RuntimeError("boom")
        after = (sys.stdout, sys.stderr, handler.stream, list(logging.getLogger("pipeline").handlers),
                 list(warnings.filters), warnings.showwarning)
    finally:
        library.removeHandler(handler)
    assert after == before
    assert raised.value.log_path == str(tmp_path / "train.log")
    text = (tmp_path / "train.log").read_text()
    for expected in ("{'loss': 1.0}", "UserWarning: probe warning", "library says", "RuntimeError: boom"):
        assert expected in text
    assert console.active == [] and console.stream.getvalue() == "  sft 1/10\n"  # closed by the capture


def test_before_after_pairs_and_summary_by_hand():
    metrics = {"train_rows": 32, "eval_loss_before": 2.0, "train_loss": 1.5, "eval_loss_after": 1.0,
               "eval_accuracy_before": 0.5, "eval_accuracy": 0.75, "kl": 0.01, "eval_margin_before": 1.0}
    assert measures.before_after(metrics) == [("eval_loss", 2.0, 1.0), ("eval_accuracy", 0.5, 0.75)]
    assert measures.summary(metrics) == ("eval_loss 2 -> 1, eval_accuracy 0.5 -> 0.75, train_loss 1.5, kl 0.01, "
                                         "eval_margin_before 1")
