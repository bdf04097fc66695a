"""Evaluation: the local `evaluate` metric modules (offline, hand cases), the `pipeline eval` CLI on a tiny trained
chain (numbers in manifests and a valid Hub model-index equal to independently computed ones), win rate with its
ties rule, the `evaluate` stage, and a local lm-eval task run offline.

Run: .venv/bin/python -m pytest tests/test_evaluation.py -q   (add `-m slow` for the lm-eval test)
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import artifacts
from pipeline.eval import harness, metrics
from pipeline.eval.metrics import win_rate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def chain(tiny_chain, tmp_path) -> Path:
    """A private copy of the session's tiny chain output, safe to modify."""
    return Path(shutil.copytree(tiny_chain.output, tmp_path / "out"))


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------- metric modules


def test_metric_modules_load_offline_by_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in metrics.NAMES:
        assert metrics.path(name).is_file()
        assert metrics.load(name) is not None
    with pytest.raises(ValueError):
        metrics.path("accuracy")


def test_exact_match_module_hand_cases():
    metric = metrics.load("exact_match")
    result = metric.compute(predictions=["3 + 4 = 7", "the answer is 12.", "no number", "  ok "],
                            references=["7", "13", "no number", "ok"])
    assert result["exact_match"] == pytest.approx(3 / 4)
    assert metric.compute(predictions=["-5", "2 + 2 = 4 or 5"], references=["-5", "4"])["exact_match"] == 0.5


def test_pairwise_and_perplexity_modules_hand_cases():
    pairs = metrics.load("pairwise_accuracy").compute(predictions=[1.0, 2.0, 0.0], references=[0.0, 3.0, 0.0])
    assert pairs["pairwise_accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert pairs["margin"] == pytest.approx((1 - 1 + 0) / 3)
    ppl = metrics.load("perplexity").compute(predictions=[2.0, 4.0], references=[1, 5])
    assert ppl["loss"] == pytest.approx(1.0)
    assert ppl["perplexity"] == pytest.approx(math.e)


def test_win_rate_ties_count_half():
    result = win_rate.from_scores([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.5])
    assert (result["wins"], result["ties"], result["losses"]) == (1, 2, 1)
    assert result["win_rate"] == pytest.approx((1 + 0.5 * 2) / 4)
    assert win_rate.from_scores([2.0, 2.0], [1.0, 2.0])["win_rate"] == pytest.approx(0.75)
    assert win_rate.from_scores([1.0], [1.05], tolerance=0.1)["win_rate"] == pytest.approx(0.5)


def test_local_task_data_files_made_absolute_only_when_needed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = harness.local_task("addition_loglik", [harness.TASKS_DIR])
    data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data_file.is_absolute() and data_file == ROOT / "data/prompts_eval.jsonl"
    assert config["output_type"] == "loglikelihood"
    monkeypatch.chdir(ROOT)
    assert harness.local_task("addition_loglik", [harness.TASKS_DIR]) is None  # found as written
    assert harness.local_task("no_such_task", [harness.TASKS_DIR]) is None


def test_flatten_lm_eval_drops_stderr():
    flat = harness.flatten_lm_eval({"addition": {"alias": "addition", "exact_match,last_number": 0.5,
                                                    "exact_match_stderr,last_number": "N/A", "acc,none": 1}})
    assert flat == {"addition/exact_match": 0.5, "addition/acc": 1.0}


def test_model_card_front_matter_rewrite_keeps_body(tmp_path):
    text = "---\nlicense: mit\ntags: [a]\n---\n\n# Title\n\nbody text\n"
    meta, body = artifacts.split_card(text)
    assert meta == {"license": "mit", "tags": ["a"]}
    assert body.startswith("# Title") and "body text" in body


# --------------------------------------------------------------------------------------------- on the chain


def eval_cli(*argv: str) -> int:
    from pipeline.__main__ import main

    return main(["eval", *argv])


def model_index_values(folder: Path) -> dict[str, float]:
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.model_name
    return {r.metric_type: r.metric_value for r in card.data.eval_results}


def test_cli_eval_writes_manifests_and_model_index(chain, capsys):
    import torch

    from pipeline import data as data_lib
    from pipeline import models, schema
    from pipeline.eval import measures

    sft, reward = chain / "sft", chain / "reward"
    assert eval_cli(str(sft), str(reward)) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "pairwise_accuracy" in table

    sft_eval = manifest(sft)["evaluation"]
    assert {"perplexity", "eval_loss", "exact_match"} <= set(sft_eval)  # sft_eval.jsonl ends with checkable sums
    assert sft_eval["perplexity"] == pytest.approx(math.exp(sft_eval["eval_loss"]))
    assert 0.0 <= sft_eval["exact_match"] <= 1.0
    assert model_index_values(sft) == pytest.approx({k: v for k, v in sft_eval.items()})

    # the sft stage measured the same held-out completion loss right after training
    assert sft_eval["eval_loss"] == pytest.approx(manifest(sft)["metrics"]["eval_loss_after"], rel=1e-4)

    reward_eval = manifest(reward)["evaluation"]
    model = models.load_reward_model(str(reward))
    tokenizer = models.load_tokenizer(str(reward))
    rows = data_lib.load_data(schema.DataSection(path=str(ROOT / "data/preferences_eval.jsonl"), max_rows=8),
                              "preference").train
    with torch.no_grad():
        chosen = measures.reward_scores(model, tokenizer, rows["prompt"], rows["chosen"])
        rejected = measures.reward_scores(model, tokenizer, rows["prompt"], rows["rejected"])
    expected = measures.pairwise_accuracy(chosen, rejected)
    assert reward_eval["pairwise_accuracy"] == pytest.approx(expected["accuracy"])
    assert reward_eval["reward_margin"] == pytest.approx(expected["margin"], abs=1e-6)
    # the reward stage measured the same held-out pairs (its max_eval_rows) right after training
    assert reward_eval["pairwise_accuracy"] == pytest.approx(manifest(reward)["metrics"]["eval_accuracy"])
    assert reward_eval["reward_margin"] == pytest.approx(manifest(reward)["metrics"]["eval_margin"], abs=1e-6)
    card = model_index_values(reward)
    assert card["pairwise_accuracy"] == pytest.approx(expected["accuracy"])
    meta, body = artifacts.split_card((reward / "README.md").read_text())
    assert meta["model-index"][0]["results"][0]["task"]["type"] == "text-classification"
    assert "## Lineage" in body and meta["license"]


def test_cli_win_rate_against_itself_is_all_ties(chain):
    sft, reward = chain / "sft", chain / "reward"
    assert eval_cli(str(sft), "--metric", "win_rate", "--reward-model", str(reward), "--reference", str(sft),
                    "--data", str(ROOT / "data/prompts_eval.jsonl"), "--limit", "3") == 0
    # greedy decoding is deterministic, so the same policy ties on every prompt: exactly one half
    assert manifest(sft)["evaluation"]["win_rate"] == pytest.approx(0.5)
    assert model_index_values(sft)["win_rate"] == pytest.approx(0.5)


def test_evaluate_stage_writes_report_artifact(tiny_chain, tmp_path):
    from pipeline import recipe as recipe_lib
    from pipeline import runner

    out = Path(shutil.copytree(tiny_chain.output, tmp_path / "out"))
    spec = {**tiny_chain.spec, "output_dir": str(out)}
    spec["stages"] = {**spec["stages"], "evaluate": {
        "kind": "evaluate", "model": "${sft}", "batch_size": 4, "evals": [
            {"metric": "perplexity"},
            {"metric": "win_rate", "data": {"path": str(ROOT / "data/prompts_eval.jsonl")},
             "reward_model": "${reward}", "reference": "${base}", "limit": 3, "max_new_tokens": 4}]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = runner.run_recipe(recipe_lib.load_recipe(path))
    report = done["evaluate"]
    assert report.produces == "report"
    results = json.loads((report.path / "results.json").read_text())
    values = {r["key"]: r["value"] for r in results["results"]}
    assert 0.0 <= values["win_rate"] <= 1.0
    assert values["perplexity"] == pytest.approx(math.exp(values["eval_loss"]))
    assert report.manifest["metrics"] == pytest.approx(values)
    assert manifest(out / "sft")["evaluation"] == pytest.approx(values)
    assert model_index_values(out / "sft") == pytest.approx(values)
    assert done["sft"].fingerprint == manifest(tiny_chain.output / "sft")["fingerprint"]  # reused, not retrained


@pytest.mark.slow
def test_lm_eval_local_task_offline(chain, monkeypatch):
    monkeypatch.chdir(chain)  # away from the repo root: the shipped tasks' relative data_files are still found
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    sft = chain / "sft"
    assert eval_cli(str(sft), "--tasks", "addition_loglik,addition",
                    "--include-path", str(ROOT / "pipeline/eval/lm_eval_tasks"), "--limit", "3") == 0
    values = manifest(sft)["evaluation"]
    assert 0.0 <= values["addition_loglik/acc"] <= 1.0
    assert values["addition_loglik/perplexity"] > 1.0
    assert 0.0 <= values["addition/exact_match"] <= 1.0
    assert model_index_values(sft)["addition_loglik/acc"] == pytest.approx(values["addition_loglik/acc"])


def test_cli_errors_are_one_line_user_errors(tmp_path, capsys):
    assert eval_cli(str(tmp_path / "missing")) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert eval_cli(str(tmp_path)) == 2  # no manifest, no --data: nothing to evaluate on
    assert "no held-out data" in capsys.readouterr().err


def test_win_rate_needs_judge_and_reference(chain, capsys):
    assert eval_cli(str(chain / "sft"), "--metric", "win_rate", "--limit", "2") == 2
    assert "reward model and a reference" in capsys.readouterr().err


def test_perplexity_on_preference_data_scores_the_chosen_answers(chain):
    from pipeline import data as data_lib
    from pipeline import models, schema
    from pipeline.eval import measures

    sft, file = chain / "sft", str(ROOT / "data/preferences_eval.jsonl")
    assert eval_cli(str(sft), "--metric", "perplexity", "--data", file, "--limit", "4") == 0
    got = manifest(sft)["evaluation"]
    model = models.load_causal_lm(str(sft), schema.ModelSection(path=str(sft)))
    tokenizer = models.load_tokenizer(str(sft))
    rows = data_lib.load_data(schema.DataSection(path=file, max_rows=4), "preference").train
    logps = measures.completion_logprobs(model, tokenizer, rows["prompt"], rows["chosen"])
    tokens = sum(len(tokenizer(measures.render(tokenizer, p, c)[1], add_special_tokens=False)["input_ids"])
                 for p, c in zip(rows["prompt"], rows["chosen"]))
    assert got["eval_loss"] == pytest.approx(-sum(logps) / tokens, rel=1e-5)
    assert manifest(sft)["evaluation_datasets"]["perplexity"] == file


def test_seeded_sampling_repeats_its_draws_and_leaves_the_global_stream_alone():
    """Before/after sampled measures draw the same random numbers, and training after them draws what it would."""
    import torch

    from pipeline.eval.measures import seeded_sampling

    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    with seeded_sampling(0):
        first = torch.rand(4)
    with seeded_sampling(0):
        second = torch.rand(4)
    assert torch.equal(first, second)
    assert torch.equal(torch.rand(3), expected_next)


def test_evaluations_read_the_rows_a_stage_held_out(tmp_path):
    """An artifact whose stage held `eval_rows` out of its one file is evaluated on exactly those rows (drawn by
    the stage's seed, recorded in its manifest), not on the file's first rows, which it trained on."""
    from pipeline import data as data_lib
    from pipeline import schema
    from pipeline.eval import heldout

    section = schema.DataSection(path=str(ROOT / "data" / "prompts.jsonl"), eval_rows=6)
    held = data_lib.load_data(section, "prompts", seed=3)
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({
        "complete": True, "fingerprint": "f", "seed": 3, "produces": "causal-lm", "held_out": held.held_out,
        "config": {"data": section.model_dump(mode="json")}}))
    default = heldout.default_data(folder)
    assert default.eval_rows == 6 and default.hold_out_seed == 3
    got = heldout.read_eval_rows(default, "prompts")
    assert [r["prompt"] for r in got] == [r["prompt"] for r in held.eval]
    assert len(heldout.read_eval_rows(default, "prompts", limit=2)) == 2
    first_rows = heldout.read_eval_rows(schema.DataSection(path=section.path), "prompts", limit=6)
    assert [r["prompt"] for r in got] != [r["prompt"] for r in first_rows]


def test_completion_logprobs_row_by_row_equal_the_whole_batch_formula():
    """completion_logprobs takes each row's log-softmax alone (memory: one row's float copy of T x V, not the
    batch's): the sums equal those of the whole-batch formula exactly."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.eval import measures
    from test_reward_model import chat_tokenizer

    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    prompts = [[{"role": "user", "content": text}] for text in ("hi", "question about words", "go")]
    answers = [[{"role": "assistant", "content": text}] for text in ("hello there", "one", "a good answer 1 2 3")]
    got = measures.completion_logprobs(model, tokenizer, prompts, answers)
    ids, targets = [], []
    for prompt, answer in zip(prompts, answers):
        p, c = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in measures.render(tokenizer, prompt,
                                                                                                   answer))
        ids.append(p + c)
        targets.append([0] * len(p) + [1] * len(c))
    width = max(map(len, ids))
    input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in ids])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
    target = torch.tensor([t + [0] * (width - len(t)) for t in targets])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    assert got == (logp * target[:, 1:]).sum(-1).tolist()
