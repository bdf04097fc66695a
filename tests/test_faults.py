"""Training faults: a NaN/inf loss or gradient stops the stage with one clear line (exit 1) and keeps the last good
checkpoint, writing no artifact; running out of disk while saving leaves the previous artifact intact and loadable.

Run: `pytest tests/test_faults.py` (tiny CLI runs and in-process runs of a tiny recipe, ~1 min).
"""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from pipeline import artifacts, models
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from resilience_common import cli, snapshot, tiny_recipe, write_recipe


def _error_lines(stderr: str) -> list[str]:
    """The CLI's error lines (a progress bar may share the terminal line, so cut at 'error: ')."""
    return [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]


def test_nan_loss_stops_stage_and_keeps_last_checkpoint(tmp_path):
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, stages=("tokenizer", "base")))
    result = cli("run", str(recipe), extra_env={"PIPELINE_TEST_NAN_AT": "base:3"})
    assert result.returncode == 1, result.stderr[-2000:]
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "loss became nan at step 3" in errors[0], errors
    assert "stages.base.train.learning_rate" in errors[0] and "fix:" in errors[0]
    assert "Traceback" not in result.stderr
    out = tmp_path / "out"
    assert not (out / "base").exists(), "no artifact for a diverged stage"
    kept = sorted(p.name for p in out.glob(".work/base-*/checkpoints/checkpoint-*"))
    assert kept == ["checkpoint-2"]
    # the kept checkpoint is usable: the rerun resumes from it and finishes
    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert artifacts.open_artifact(out / "base") is not None


@pytest.mark.slow
def test_real_divergence_is_caught(tmp_path):
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, stages=("tokenizer", "base"), learning_rate=1e30))
    result = cli("run", str(recipe))
    assert result.returncode == 1
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "became nan" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "out" / "base").exists()


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A complete tokenizer -> base run, done in-process once."""
    tmp = tmp_path_factory.mktemp("disk")
    recipe_path = write_recipe(tmp, tiny_recipe(tmp, stages=("tokenizer", "base"), steps=2))
    run_recipe(load_recipe(recipe_path))
    return recipe_path, tmp / "out"


def _assert_intact(folder: Path, before: dict) -> None:
    assert snapshot(folder) == before
    assert artifacts.open_artifact(folder) is not None


def test_out_of_disk_while_saving_weights_keeps_previous_artifact(built, monkeypatch):
    recipe_path, out = built
    before = snapshot(out / "base")
    real_save = models.save_model

    def full_disk(model, tokenizer, folder, **kwargs):
        real_save(model, tokenizer, folder, **kwargs)  # half the files land, then the disk is full
        (Path(folder) / "model.safetensors").write_bytes(b"truncated")
        _enospc()

    monkeypatch.setattr(models, "save_model", full_disk)
    with pytest.raises(OSError) as info:
        run_recipe(load_recipe(recipe_path), force={"base"})
    assert info.value.errno == errno.ENOSPC
    _assert_intact(out / "base", before)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "base", use_safetensors=True)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_out_of_disk_while_writing_manifest_keeps_previous_artifact(built, monkeypatch):
    recipe_path, out = built
    before = snapshot(out / "tokenizer")
    monkeypatch.setattr(artifacts, "write_json_atomic", _enospc)
    with pytest.raises(OSError):
        run_recipe(load_recipe(recipe_path), force={"tokenizer"}, only={"tokenizer"})
    _assert_intact(out / "tokenizer", before)
    monkeypatch.undo()
    assert json.loads((out / "tokenizer" / "manifest.json").read_text())["complete"] is True


def test_crash_during_swap_restores_previous_artifact(tmp_path):
    """Killed between moving the old artifact aside and moving the new one in: the next run puts the old one back."""
    out = tmp_path / "out"
    old = artifacts.ArtifactWriter(out, "sft", "a" * 64)
    old.prepare()
    (old.tmp / "weights").write_text("old")
    old.commit({"stage": "sft"})
    new = artifacts.ArtifactWriter(out, "sft", "b" * 64)
    new.prepare()
    (new.tmp / "weights").write_text("new")
    # simulate the crash state: manifest written, old artifact moved aside, new one not yet in place
    artifacts.write_json_atomic(new.tmp / artifacts.MANIFEST, {"complete": True, "fingerprint": "b" * 64})
    (out / ".tmp").mkdir(exist_ok=True)
    aside = out / ".tmp" / "sft-replaced-1"
    (out / "sft").rename(aside)
    assert artifacts.open_artifact(out / "sft") is None
    artifacts.recover_output_dir(out, ["sft"])
    assert artifacts.open_artifact(out / "sft").fingerprint == "a" * 64
    # the finished-but-unmoved new artifact is promoted, not retrained
    assert new.pending_complete()
    assert new.promote().fingerprint == "b" * 64 and (out / "sft" / "weights").read_text() == "new"


def test_interrupted_artifact_is_never_complete(tmp_path):
    """A temporary folder with files but no manifest (killed mid-save) is not complete and is wiped on prepare."""
    writer = artifacts.ArtifactWriter(tmp_path / "out", "sft", "c" * 64)
    writer.prepare()
    (writer.tmp / "model.safetensors").write_bytes(b"partial")
    assert not writer.pending_complete()
    assert artifacts.open_artifact(writer.tmp) is None and artifacts.open_artifact(writer.final) is None
    writer.prepare()
    assert list(writer.tmp.iterdir()) == []


def test_out_of_disk_at_the_cli_is_one_line_not_a_traceback(built, monkeypatch, capsys):
    from pipeline.__main__ import main

    recipe_path, out = built
    before = snapshot(out / "base")
    monkeypatch.setattr(models, "save_model", _enospc)
    assert main(["run", str(recipe_path), "--force", "base"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "disk full" in errors[0] and "rerun" in errors[0], err[-2000:]
    assert "Traceback" not in err
    _assert_intact(out / "base", before)
