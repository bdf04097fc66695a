"""`report_to:` trackers: TensorBoard event files hold the SFT loss series (the transformers trainer's callback) and
the PPO reward and KL series (our loop, through Accelerate's tracker API) on the manifests' step axis, with the run's
resolved config; W&B offline and an MLflow file store get the same when their clients are installed; trackers change
no fingerprint; a tracker whose package is missing is one line naming the extra to install (exit 2).

Run: .venv/bin/python -m pytest tests/test_tracking.py -q    (tiny in-process runs, ~30 s; needs tensorboard)
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from pipeline import recipe as recipe_lib
from pipeline import runner, tracking
from pipeline.artifacts import read_manifest

PPO = {"kind": "ppo", "model": "${sft}", "reward_model": "${reward}",
       "data": {"path": str(ROOT / "data/prompts.jsonl"), "eval_path": str(ROOT / "data/prompts_eval.jsonl"),
                "max_rows": 32},
       "train": {"learning_rate": 1e-3}, "total_episodes": 12, "rollout_batch_size": 4, "mini_batch_size": 2,
       "ppo_epochs": 1, "max_new_tokens": 6, "eval_prompts": 4, "eval_samples": 1}


def tracked_run(tiny_chain, folder: Path, report_to) -> Path:
    """The tiny chain copied into `folder` plus a PPO stage, with `report_to`; sft is rerun (its artifact is
    reused otherwise: trackers are not part of the fingerprint) and ppo runs. Returns the output folder."""
    out = Path(shutil.copytree(tiny_chain.output, folder / "out"))
    spec = copy.deepcopy(tiny_chain.spec)
    spec.update(output_dir=str(out), report_to=report_to)
    spec["stages"]["ppo"] = PPO
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    runner.run_recipe(recipe_lib.load_recipe(path), force={"sft"})
    return out


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from the TensorBoard event files in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def logged(manifest: dict, key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in manifest["log_history"] if key in e and "train_loss" not in e]


@pytest.fixture(scope="module")
def tensorboard_run(tiny_chain, tmp_path_factory):
    return tracked_run(tiny_chain, tmp_path_factory.mktemp("tensorboard"), "tensorboard")


def test_tensorboard_holds_the_sft_loss_and_the_ppo_reward_and_kl(tensorboard_run):
    out = tensorboard_run
    sft, ppo = read_manifest(out / "sft"), read_manifest(out / "ppo")
    sft_series = scalars(out / tracking.TRACKING_DIR / "sft")
    assert len(logged(sft, "loss")) >= 3
    assert sft_series["train/loss"] == [(s, pytest.approx(v, rel=1e-5)) for s, v in logged(sft, "loss")]
    ppo_series = scalars(out / tracking.TRACKING_DIR / "ppo")
    for key in ("reward/mean", "kl", "policy/entropy", "response_length"):
        assert ppo_series[f"train/{key}"] == [(s, pytest.approx(v, rel=1e-5, abs=1e-7)) for s, v in
                                               logged(ppo, key)], key
    assert [s for s, _ in ppo_series["train/kl"]] == list(range(1, ppo["metrics"]["steps"] + 1))


def test_tensorboard_gets_the_run_name_and_resolved_config(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tensorboard_run
    events = EventAccumulator(str(out / tracking.TRACKING_DIR / "sft"), size_guidance={"tensors": 0}).Reload()
    text = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    config = json.loads("\n".join(line[4:] for line in text.splitlines()))
    assert config["recipe"] == "tiny-chain" and config["stage"] == "sft" and config["kind"] == "sft"
    assert config["config"]["model"]["path"] == str((out / "base").resolve())  # ${base}, resolved
    args = json.loads(events.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode())
    assert args["run_name"] == "tiny-chain/sft" and args["report_to"] == ["tensorboard"]
    hparams = [yaml.safe_load(p.read_text()) for p in (out / tracking.TRACKING_DIR / "ppo").glob("*/hparams.yml")]
    assert len(hparams) == 1 and hparams[0]["stage"] == "ppo"
    assert hparams[0]["config.reward_model"] == str((out / "reward").resolve())
    assert hparams[0]["config.kl_coef"] == read_manifest(out / "ppo")["config"]["kl_coef"]


def test_the_run_report_has_the_ppo_curves(tensorboard_run):
    html = (tensorboard_run / "report.html").read_text()
    for name in ("rl_ppo.png", "measures_ppo.png", "loss_sft.png", "measures_sft.png"):
        assert (tensorboard_run / "report_assets" / name).stat().st_size > 3000
        assert f"report_assets/{name}" in html


def test_trackers_change_no_fingerprint(tiny_chain):
    recipe = recipe_lib.load_recipe(tiny_chain.recipe, ["report_to=tensorboard", "stages.sft.report_to=[wandb, none]"])
    assert tracking.stage_trackers(recipe, "sft") == ["wandb"]
    assert tracking.stage_trackers(recipe, "base") == ["tensorboard"]
    assert {action for _, _, action in runner.plan(recipe)} == {"skip"}


def test_normalize_by_hand():
    assert tracking.normalize(None) == [] and tracking.normalize("none") == []
    assert tracking.normalize("wandb") == ["wandb"]
    assert tracking.normalize(["tensorboard", "none", "tensorboard", "mlflow"]) == ["tensorboard", "mlflow"]


def test_missing_tracker_package_is_one_line_naming_the_extra(tiny_chain, monkeypatch, capsys):
    from pipeline.__main__ import main

    monkeypatch.setitem(tracking.PACKAGES, "wandb", ("no_such_tracker_module", "wandb"))
    assert main(["run", str(tiny_chain.recipe), "stages.sft.report_to=wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stages.sft.report_to" in err[0], err
    assert "no_such_tracker_module" in err[0] and "pip install 'hf-pipeline[wandb]'" in err[0]


def test_wandb_offline_and_mlflow_file_store(tiny_chain, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tracked_run(tiny_chain, tmp_path, ["wandb", "mlflow"])
    runs = sorted((out / tracking.TRACKING_DIR / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(list(run.glob("*.wandb")) for run in runs)
    import mlflow

    found = mlflow.search_runs(experiment_names=["tiny-chain"], output_format="list")
    by_name = {run.info.run_name: run for run in found}
    assert set(by_name) == {"tiny-chain/sft", "tiny-chain/ppo"}
    client = mlflow.MlflowClient()
    ppo = read_manifest(out / "ppo")
    history = client.get_metric_history(by_name["tiny-chain/ppo"].info.run_id, "train/reward/mean")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(v, rel=1e-6)) for s, v in
                                                    logged(ppo, "reward/mean")]
    assert client.get_metric_history(by_name["tiny-chain/sft"].info.run_id, "loss")
    assert by_name["tiny-chain/ppo"].data.params["stage"] == "ppo"
