"""Every stage kind trains a few steps on a tiny model (CPU, seconds) through the runner; its artifact loads with
the stock classes, its parameters moved away from its parent's, and it carries a manifest and a Hub model card.
Also: a rerun skips every stage, `--force STAGE` reruns only that stage, and HH-RLHF pairs normalise.

    pytest tests/test_stages.py
"""
from __future__ import annotations

import gzip
import itertools
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_chain_spec

HH_FILE = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"  # ../shared
STAGES = ("tokenizer", "base", "sft", "sft_lora", "reward", "dpo", "dpo_lora", "merged")


def all_stages_spec(output_dir: Path) -> dict:
    """The shared tiny chain plus LoRA SFT, full and LoRA DPO, and a merge: every trainable stage kind."""
    spec = tiny_chain_spec(output_dir)
    stages = spec["stages"]
    train = {**stages["sft"]["train"], "max_steps": 3}
    for name in ("base", "sft", "reward"):
        stages[name]["train"] = dict(train)
    prefs = stages["reward"]["data"]
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    stages["sft_lora"] = {**stages["sft"], "lora": lora}
    stages["dpo"] = {"kind": "dpo", "model": "${sft}", "data": prefs, "train": dict(train), "beta": 0.1}
    stages["dpo_lora"] = {**stages["dpo"], "lora": lora}
    stages["merged"] = {"kind": "merge", "model": "${sft_lora}"}
    return spec


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """All stage kinds trained once per session; returns (recipe path, output folder)."""
    from pipeline import runner
    from pipeline.recipe import load_recipe

    root = tmp_path_factory.mktemp("all_stages")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(all_stages_spec(root / "out"), sort_keys=False))
    runner.run_recipe(load_recipe(path))
    return path, root / "out"


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(after: dict, before: dict, prefix_after: str = "", prefix_before: str = "") -> list[str]:
    """Names of shared parameters whose values differ."""
    import torch

    names = [k for k in after if k.startswith(prefix_after)]
    out = []
    for name in names:
        other = prefix_before + name[len(prefix_after):]
        if other in before and before[other].shape == after[name].shape and not torch.equal(before[other], after[name]):
            out.append(name)
    return out


def causal_lm(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def test_tokenizer_artifact(chain):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chain[1] / "tokenizer")
    assert tokenizer.chat_template and tokenizer.pad_token_id != tokenizer.eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@pytest.mark.parametrize("stage, parent", [("base", None), ("sft", "base"), ("dpo", "sft"), ("merged", "base")])
def test_full_model_artifacts_load_and_changed(chain, stage, parent):
    model = causal_lm(chain[1] / stage)
    if parent is None:  # pretraining from scratch: held-out loss must have moved
        metrics = manifest(chain[1] / stage)["metrics"]
        assert metrics["eval_loss_after"] != metrics["eval_loss_before"]
        return
    moved = changed(weights(model), weights(causal_lm(chain[1] / parent)))
    assert moved, f"{stage} has the same weights as {parent}"


@pytest.mark.parametrize("stage, parent", [("sft_lora", "base"), ("dpo_lora", "sft")])
def test_lora_artifacts_load_as_peft_and_trained(chain, stage, parent):
    from peft import AutoPeftModelForCausalLM

    folder = chain[1] / stage
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(folder)
    lora_b = [v for k, v in model.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero; training must move it"
    merged = weights(model.merge_and_unload())
    assert changed(merged, weights(causal_lm(chain[1] / parent)))


def test_reward_artifact_loads_as_sequence_classifier(chain):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = chain[1] / "reward"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    base = weights(causal_lm(chain[1] / "base"))
    assert changed(weights(model), base, "model.", "model.")
    with torch.no_grad():
        out = model(**tokenizer(["1 + 1 = 2"], return_tensors="pt")).logits
    assert out.shape == (1, 1)


@pytest.mark.parametrize("stage", STAGES)
def test_manifest_and_model_card(chain, stage):
    folder = chain[1] / stage
    data = manifest(folder)
    for key in ("fingerprint", "parents", "metrics", "libraries", "config", "lineage", "duration_s"):
        assert key in data, key
    assert data["complete"] and data["stage"] == stage and data["config"]["kind"] == data["kind"]
    assert {"torch", "transformers"} <= set(data["libraries"])
    if stage != "tokenizer":
        assert data["parents"] and all(p["fingerprint"] for p in data["parents"])
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] and "hf-pipeline" in meta["tags"] and data["kind"] in meta["tags"]
    if stage not in ("tokenizer", "base"):
        assert meta["base_model"]


def copy_output(chain, tmp_path) -> tuple[Path, list[str]]:
    out = tmp_path / "out"
    shutil.copytree(chain[1], out)
    return out, [f"output_dir={out}"]


def run_and_capture(path, overrides, capsys, force=None) -> str:
    from pipeline import runner
    from pipeline.recipe import load_recipe

    capsys.readouterr()
    runner.run_recipe(load_recipe(path, overrides), force=force)
    return capsys.readouterr().out


def test_rerun_skips_every_stage(chain, tmp_path, capsys):
    out, overrides = copy_output(chain, tmp_path)
    before = {s: manifest(out / s)["created_at"] for s in STAGES}
    printed = run_and_capture(chain[0], overrides, capsys)
    assert printed.count("up to date, skipped") == len(STAGES) and "running" not in printed
    assert {s: manifest(out / s)["created_at"] for s in STAGES} == before


def test_force_reruns_only_that_stage(chain, tmp_path, capsys):
    out, overrides = copy_output(chain, tmp_path)
    fingerprint = manifest(out / "sft")["fingerprint"]
    (out / "sft" / "marker").write_text("old artifact")
    printed = run_and_capture(chain[0], overrides, capsys, force={"sft"})
    assert "sft (sft): running" in printed
    assert printed.count("up to date, skipped") == len(STAGES) - 1
    assert not (out / "sft" / "marker").exists() and manifest(out / "sft")["fingerprint"] == fingerprint


# ---------------------------------------------------------------------------------------- preference normalising


def hh_rows(n: int = 5) -> list[dict]:
    assert HH_FILE.exists(), f"{HH_FILE} missing: the real HH-RLHF data lives in ../shared beside the repo"
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, n)]


def test_parse_hh_turns():
    from pipeline.data import parse_hh

    messages = parse_hh("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[-1]["content"] == "4" and messages[0]["content"] == "hi there"
    assert parse_hh("no turns here") is None


def test_hh_rlhf_rows_normalise_to_prompt_chosen_rejected():
    from pipeline.data import normalise_row, parse_hh

    for row in hh_rows():
        item, reason = normalise_row(row, "preference", {})
        assert reason is None and item is not None
        chosen, rejected = parse_hh(row["chosen"]), parse_hh(row["rejected"])
        assert item["prompt"] + item["chosen"] == chosen and item["prompt"] + item["rejected"] == rejected
        assert item["prompt"][0]["role"] == "user" and item["prompt"][-1]["role"] == "user"
        assert item["chosen"][0]["role"] == "assistant" and item["chosen"] != item["rejected"]


def test_pretrained_base_keeps_the_chat_end_of_sequence(tiny_chain):
    """Packing separates documents with <|endoftext|>, but the artifact keeps the tokenizer's chat EOS (<|im_end|>):
    with the separator as EOS, greedy answers ran past the end of their turn and exact match read the next turn."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    base, tokenizer = tiny_chain.output / "base", AutoTokenizer.from_pretrained(tiny_chain.output / "tokenizer")
    assert tokenizer.eos_token == "<|im_end|>"
    assert AutoTokenizer.from_pretrained(base).eos_token == "<|im_end|>"
    assert AutoConfig.from_pretrained(base).eos_token_id == tokenizer.eos_token_id
    eos = GenerationConfig.from_pretrained(base).eos_token_id
    assert eos == tokenizer.eos_token_id or eos == [tokenizer.eos_token_id]
