"""Kill a run at several points and rerun the same command: it must continue (skipping finished stages, resuming a
stage from its last checkpoint) and end with the same weights as an uninterrupted run; finished artifacts are never
rewritten and an interrupted one is never taken for complete.

A resumed stage's manifest must also equal the uninterrupted one's, metrics and log history included, except
for when it ran and for how long (created_at, durations, the attempt record, timing).

Run: `pytest tests/test_resume.py` (subprocess runs of a tiny tokenizer -> pretrain -> sft recipe, ~1-2 min;
the kill-at-every-point sweep and the every-stage-kind kill test are marked slow).
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.attempts import AttemptLog
from pipeline.artifacts import split_timing
from pipeline.training import whole_run_loss
from resilience_common import ROOT, assert_same_manifests, cli, snapshot, tiny_recipe, weights, write_recipe

ATOL = 1e-5
TINY_STAGES = ("tokenizer", "base", "sft")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Output folder of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    result = cli("run", str(write_recipe(tmp, tiny_recipe(tmp))))
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp / "out"


def _assert_same_weights(out: Path, reference: Path) -> None:
    for stage in ("base", "sft"):
        got, want = weights(out / stage), weights(reference / stage)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.allclose(got[key], want[key], atol=ATOL), f"{stage}/{key} differs after resume"


def _killed_run(tmp: Path, kill_at: str) -> Path:
    """Run with a SIGKILL injected at `stage:step`; return the recipe path."""
    recipe = write_recipe(tmp, tiny_recipe(tmp))
    result = cli("run", str(recipe), extra_env={"PIPELINE_TEST_KILL_AT": kill_at})
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-2000:])
    return recipe


def _checkpoints(out: Path, stage: str) -> list[str]:
    return sorted(p.name for p in out.glob(f".work/{stage}-*/checkpoints/checkpoint-*"))


def test_kill_inside_second_stage_resumes_from_checkpoint(tmp_path, reference):
    recipe = _killed_run(tmp_path, "sft:3")
    out = tmp_path / "out"
    assert (out / "tokenizer/manifest.json").exists() and (out / "base/manifest.json").exists()
    assert not (out / "sft").exists(), "an interrupted stage must not look complete"
    assert _checkpoints(out, "sft") == ["checkpoint-2"]
    before = {stage: snapshot(out / stage) for stage in ("tokenizer", "base")}

    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokenizer (tokenizer): up to date, skipped" in result.stdout
    assert "base (pretrain): up to date, skipped" in result.stdout
    progress = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("  sft ")]
    assert progress == ["3/6", "4/6", "5/6", "6/6"], "sft must resume at step 3, not retrain steps 1-2"
    for stage, files in before.items():
        assert snapshot(out / stage) == files, f"{stage} was rewritten by the rerun"
    _assert_same_weights(out, reference)
    assert not list(out.glob(".work/sft-*")), "checkpoints are removed once the artifact is complete"
    assert_same_manifests(out, reference, TINY_STAGES, roots=(tmp_path, reference.parent))


def _manifest(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "manifest.json").read_text())


def _assert_attempts(manifest: dict, resumed_from: list[int]) -> None:
    """The attempt record: one attempt per run that worked on the stage, the killed ones counted to their last
    checkpoint, and duration_s their sum."""
    attempts = manifest["attempts"]
    assert [a["resumed_from_step"] for a in attempts] == resumed_from, manifest["stage"]
    assert [a["last_checkpoint_step"] for a in attempts[:-1]] == resumed_from[1:], manifest["stage"]
    assert all(a["duration_s"] > 0 for a in attempts), attempts
    assert manifest["duration_s"] == pytest.approx(sum(a["duration_s"] for a in attempts), abs=2e-3)
    assert manifest["last_attempt_duration_s"] == attempts[-1]["duration_s"]


def test_resumed_pretrain_writes_the_uninterrupted_manifest(tmp_path, reference):
    """Killed at step 3 of `base` (after checkpoint-2), then rerun: every manifest equals the uninterrupted run's
    but for timestamps, durations, timing and the attempt record, which shows both attempts."""
    recipe = _killed_run(tmp_path, "base:3")
    assert cli("run", str(recipe)).returncode == 0
    out = tmp_path / "out"
    assert_same_manifests(out, reference, TINY_STAGES, roots=(tmp_path, reference.parent))
    _assert_attempts(_manifest(out, "base"), [0, 2])
    _assert_attempts(_manifest(out, "sft"), [0])
    assert _manifest(out, "base")["timing"]["log_history"][-1]["train_runtime"] > 0


@pytest.mark.slow
def test_kill_inside_first_trained_stage(tmp_path, reference):
    recipe = _killed_run(tmp_path, "base:4")
    out = tmp_path / "out"
    assert not (out / "base").exists() and _checkpoints(out, "base") == ["checkpoint-2", "checkpoint-4"]
    before = snapshot(out / "tokenizer")
    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert snapshot(out / "tokenizer") == before
    _assert_same_weights(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["base:1", "base:5", "sft:1", "sft:2", "sft:5"])
def test_kill_anywhere_then_resume(tmp_path, reference, kill_at):
    recipe = _killed_run(tmp_path, kill_at)
    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_same_weights(tmp_path / "out", reference)


@pytest.mark.slow
def test_rerun_of_complete_run_rewrites_nothing(tmp_path):
    """Killed 'between stages' and after the end look the same to the rerun: complete artifacts are skipped."""
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, stages=("tokenizer", "base")))
    assert cli("run", str(recipe)).returncode == 0
    out = tmp_path / "out"
    before = {stage: snapshot(out / stage) for stage in ("tokenizer", "base")}
    result = cli("run", str(recipe))
    assert result.returncode == 0
    assert result.stdout.count("up to date, skipped") == 2
    assert {stage: snapshot(out / stage) for stage in ("tokenizer", "base")} == before


def test_attempt_log_counts_a_killed_attempt_up_to_its_last_checkpoint(tmp_path):
    now = [100.0]
    first = AttemptLog(tmp_path, clock=lambda: now[0])
    first.start()
    now[0] = 110.0
    first.progress(2)
    now[0] = 115.0  # SIGKILL here: the 5 s after the checkpoint are not recorded
    second = AttemptLog(tmp_path, clock=lambda: now[0])  # the rerun
    now[0] = 200.0
    second.start()
    assert second.records[-1]["resumed_from_step"] == 2, "until the stage says, it resumes from the last checkpoint"
    second.resumed_from(2)
    now[0] = 230.0
    done = second.finish()
    assert done["duration_s"] == 40.0 and done["last_attempt_duration_s"] == 30.0
    assert [(a["resumed_from_step"], a["duration_s"], a["last_checkpoint_step"]) for a in done["attempts"]] == \
        [(0, 10.0, 2), (2, 30.0, None)]
    assert json.loads((tmp_path / "attempts.json").read_text()) == done["attempts"]


def test_attempt_log_of_other_ranks_writes_nothing(tmp_path):
    log = AttemptLog(tmp_path, write=False)
    log.start()
    log.progress(1)
    assert log.finish()["attempts"][0]["last_checkpoint_step"] == 1
    assert not (tmp_path / "attempts.json").exists()


def test_whole_run_loss_weights_each_logged_loss_by_its_steps():
    history = [{"loss": 4.0, "step": 1}, {"loss": 2.0, "step": 2}, {"loss": 1.0, "step": 4},
               {"loss": 0.25, "step": 6}, {"train_loss": 0.25, "step": 6}]  # the last two: the resumed attempt
    assert whole_run_loss(history, resumed=4, attempt_loss=0.25, attempt_steps=2) == (4 + 2 + 2 * 1 + 2 * 0.25) / 6
    assert whole_run_loss(history, resumed=0, attempt_loss=0.7, attempt_steps=6) == 0.7
    # logged every 3 steps, resumed from a checkpoint at 4: step 4's loss was never logged and is left out
    gappy = [{"loss": 2.0, "step": 3}, {"loss": 1.0, "step": 6}]
    assert whole_run_loss(gappy, resumed=4, attempt_loss=1.0, attempt_steps=2) == (3 * 2.0 + 2 * 1.0) / 5


def test_timings_leave_the_log_history():
    history = [{"loss": 1.0, "step": 1, "step_time": 0.2},
               {"kl": 0.1, "time/update": 0.3, "step": 2},
               {"train_loss": 1.0, "train_runtime": 3.0, "train_samples_per_second": 2.0, "total_flos": 5.0, "step": 2}]
    kept, timing = split_timing(history)
    assert kept == [{"loss": 1.0, "step": 1}, {"kl": 0.1, "step": 2}, {"train_loss": 1.0, "total_flos": 5.0, "step": 2}]
    assert timing == [{"step": 1, "step_time": 0.2}, {"step": 2, "time/update": 0.3},
                      {"step": 2, "train_runtime": 3.0, "train_samples_per_second": 2.0}]


EVERY_STAGE_KILLS = ("base", "sft", "reward", "dpo", "kto", "ppo", "grpo", "rloo")  # every kind that checkpoints


def _every_stage_recipe(folder: Path) -> Path:
    """recipes/every_stage.yaml writing into folder/out with a checkpoint after every step (save_steps does not
    change fingerprints). Its data paths are relative to the repo root, where `cli` runs."""
    recipe = yaml.safe_load((ROOT / "recipes" / "every_stage.yaml").read_text())
    recipe["output_dir"] = str(folder / "out")
    recipe["defaults"]["train"]["save_steps"] = 1
    folder.mkdir()
    return write_recipe(folder, recipe)


@pytest.mark.slow
def test_every_stage_kind_killed_after_its_first_checkpoint_writes_the_uninterrupted_manifest(tmp_path):
    """recipes/every_stage.yaml run once uninterrupted, and once SIGKILLed in each training stage in turn right
    after its first checkpoint (each rerun resumes that stage and goes on to the next kill): all manifests equal."""
    reference = _every_stage_recipe(tmp_path / "reference")
    result = cli("run", str(reference))
    assert result.returncode == 0, result.stderr[-2000:]
    recipe = _every_stage_recipe(tmp_path / "resumed")
    out = tmp_path / "resumed" / "out"
    for stage in EVERY_STAGE_KILLS:
        result = cli("run", str(recipe), extra_env={"PIPELINE_TEST_KILL_AT": f"{stage}:1"})
        assert result.returncode == -signal.SIGKILL, (stage, result.returncode, result.stderr[-2000:])
        assert not (out / stage).exists() and list(out.glob(f".work/{stage}-*/attempts.json")), stage
    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    stages = list(yaml.safe_load(recipe.read_text())["stages"])
    assert_same_manifests(out, tmp_path / "reference" / "out", stages,
                          roots=(tmp_path / "resumed", tmp_path / "reference"))
    for stage in stages:
        _assert_attempts(_manifest(out, stage), [0, 1] if stage in EVERY_STAGE_KILLS else [0])


def _length_grouped_recipe(folder: Path) -> Path:
    folder.mkdir()
    recipe = tiny_recipe(folder)
    recipe["stages"]["sft"]["train"] = {"group_by_length": True}
    return write_recipe(folder, recipe)


@pytest.mark.slow
def test_a_length_grouped_stage_resumes_to_the_uninterrupted_result(tmp_path, reference):
    """The length-grouped order is fixed by the seed before training, so a killed sft stage resumes on the rows the
    uninterrupted run trained on: same weights and manifest, and not the weights of the shuffled run."""
    uninterrupted = _length_grouped_recipe(tmp_path / "uninterrupted")
    result = cli("run", str(uninterrupted))
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = _length_grouped_recipe(tmp_path / "resumed")
    result = cli("run", str(resumed), extra_env={"PIPELINE_TEST_KILL_AT": "sft:3"})
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-2000:])
    result = cli("run", str(resumed))
    assert result.returncode == 0, result.stderr[-2000:]
    got, want = weights(tmp_path / "resumed/out/sft"), weights(tmp_path / "uninterrupted/out/sft")
    assert all(torch.allclose(got[key], want[key], atol=ATOL) for key in want)
    assert_same_manifests(tmp_path / "resumed/out", tmp_path / "uninterrupted/out", TINY_STAGES,
                          roots=(tmp_path / "resumed", tmp_path / "uninterrupted"))
    shuffled = weights(reference / "sft")
    assert not all(torch.allclose(got[key], shuffled[key], atol=ATOL) for key in want)
