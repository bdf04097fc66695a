"""An independent judge for win rates: `judge:` on a win_rate eval names the reward model that judges (recorded as
`win_rate_by_<judge>`, beside `win_rate` from `reward_model:`), and the evaluate stage's manifest, the evaluated
artifact's manifest, results.json and the run report say which judge it was and whether the policy was trained
against it; `data.skip_rows` trains a second reward model on the rows after those a first one read.

Run: `.venv/bin/python -m pytest tests/test_judge.py -q` (a tiny chain on CPU, seconds)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import schema
from pipeline.errors import DataError, RecipeError
from pipeline.eval.metrics import win_rate

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = str(ROOT / "data/prompts_eval.jsonl")


def write_manifest(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"complete": True, "fingerprint": folder.name, **fields}))
    return folder


def test_judge_record_knows_the_reward_model_a_policy_or_its_ancestor_trained_against(tmp_path):
    rm, other = write_manifest(tmp_path / "rm"), write_manifest(tmp_path / "other")
    ppo = write_manifest(tmp_path / "ppo", config={"kind": "ppo", "reward_model": "${rm}"},
                         resolved_references={"rm": str(rm)}, parents=[{"stage": "rm", "path": str(rm)}])
    merged = write_manifest(tmp_path / "merged", config={"kind": "merge"}, parents=[{"stage": "ppo", "path": str(ppo)}])
    dpo = write_manifest(tmp_path / "dpo", config={"kind": "dpo"}, parents=[])
    spec = lambda **judge: schema.EvalSection(metric="win_rate", reference="x", **judge)  # noqa: E731
    assert win_rate.judge_record(str(ppo), spec(judge=str(rm))) == {"path": str(rm), "is_policy_reward_model": True}
    assert win_rate.judge_record(str(merged), spec(reward_model=str(rm)))["is_policy_reward_model"]
    assert not win_rate.judge_record(str(ppo), spec(judge=str(other)))["is_policy_reward_model"]
    assert not win_rate.judge_record(str(dpo), spec(judge=str(rm)))["is_policy_reward_model"]


def test_judge_names_its_key_and_is_one_way_to_name_the_judge():
    assert win_rate.keys(schema.EvalSection(metric="win_rate", judge="/out/judge/")) == {"win_rate":
                                                                                          "win_rate_by_judge"}
    assert win_rate.keys(schema.EvalSection(metric="win_rate", reward_model="/out/reward")) == {"win_rate": "win_rate"}
    with pytest.raises(ValueError, match="set one of them"):
        schema.EvalSection(metric="win_rate", judge="a", reward_model="b")
    assert "judge" not in schema.EvalSection(metric="win_rate", reward_model="a").model_dump()  # fingerprints kept


@pytest.fixture
def judged(tiny_chain, tmp_path):
    """The tiny chain plus a second reward model on the rows after the first one's, and an evaluate stage judging
    the SFT policy against the base by both."""
    from pipeline import recipe as recipe_lib
    from pipeline import runner

    out = Path(shutil.copytree(tiny_chain.output, tmp_path / "out"))
    spec = {**tiny_chain.spec, "output_dir": str(out)}
    reward = spec["stages"]["reward"]
    judge = {**reward, "data": {**reward["data"], "skip_rows": 32}}
    wins = {"metric": "win_rate", "data": {"path": PROMPTS}, "reference": "${base}", "limit": 3, "max_new_tokens": 4}
    spec["stages"] = {**spec["stages"], "judge": judge, "evaluate": {
        "kind": "evaluate", "model": "${sft}", "batch_size": 4,
        "evals": [{**wins, "reward_model": "${reward}"}, {**wins, "judge": "${judge}"}]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return runner.run_recipe(recipe_lib.load_recipe(path)), out


def test_an_evaluate_stage_records_each_win_rate_with_its_judge(judged):
    from pipeline.tools import report

    done, out = judged
    evaluation = done["evaluate"]
    assert set(evaluation.manifest["metrics"]) == {"win_rate", "win_rate_by_judge"}
    judges = evaluation.manifest["judges"]
    assert {key: Path(judge["path"]).name for key, judge in judges.items()} == {"win_rate": "reward",
                                                                                 "win_rate_by_judge": "judge"}
    assert not any(j["is_policy_reward_model"] for j in judges.values())  # sft trained against no reward model
    sft = json.loads((out / "sft" / "manifest.json").read_text())
    assert set(sft["evaluation"]) == {"win_rate", "win_rate_by_judge"} and sft["evaluation_judges"] == judges
    results = json.loads((evaluation.path / "results.json").read_text())["results"]
    assert {r["key"]: r["judge"]["path"] for r in results} == {k: j["path"] for k, j in judges.items()}
    text = report.write_report(out).read_text()
    assert "## Win-rate judges" in text and "| evaluate | sft | win_rate_by_judge |" in text
    assert "no (independent)" in text


def test_skip_rows_leaves_out_the_rows_the_first_reward_model_read(tmp_path):
    from contexts import stage_ctx
    from datasets import Dataset

    from pipeline.stages.common import length_grouped

    rows = Dataset.from_list([{"n": i, "length": (i * 7) % 13} for i in range(40)])
    count = lambda row: row["length"]  # noqa: E731
    train = {"group_by_length": True, "batch_size": 4}
    first = length_grouped(stage_ctx(tmp_path, {"kind": "reward", "model": "m", "train": train}), rows, count)
    ctx = stage_ctx(tmp_path, {"kind": "reward", "model": "m", "train": train,
                               "data": {"path": str(ROOT / "data/preferences.jsonl"), "skip_rows": 12}})
    assert length_grouped(ctx, rows, count)["n"] == first["n"][12:]  # the same order, after the first 12
    with pytest.raises(DataError, match="skip_rows"):
        length_grouped(ctx, rows.select(range(12)), count)


def test_skip_rows_on_a_kind_whose_order_is_not_known_is_a_recipe_error(tmp_path):
    from pipeline.recipe import parse_recipe

    stage = {"kind": "kto", "model": "m", "data": {"path": str(ROOT / "data/preferences.jsonl"), "skip_rows": 8}}
    with pytest.raises(RecipeError, match="stages.kto.data.skip_rows"):
        parse_recipe({"name": "t", "stages": {"kto": stage}}, tmp_path / "r.yaml")
