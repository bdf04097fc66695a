"""QLoRA (`lora: {quantize: 4bit|8bit}`): where it cannot run (no CUDA GPU, no bitsandbytes, a kind whose trainer
does not take a quantized base) it is a one-line recipe error naming the file and `stages.X.lora.quantize`, from
`pipeline validate` and `pipeline run` alike, before anything loads; the bitsandbytes settings; the field stays out
of the fingerprint of stages that do not set it. On a CUDA machine with bitsandbytes (`-m gpu`): a tiny QLoRA sft
stage trains, its adapter loads with the stock class, and `merge: true` writes full unquantized weights.

Run: `.venv/bin/python -m pytest tests/test_qlora.py -q` (`-m gpu` for the CUDA test)
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from pipeline import models, schema
from pipeline.__main__ import main

DATA = Path(__file__).resolve().parents[1] / "data"


def sft_recipe(tmp_path: Path, policy: str, lora: dict, kind: str = "sft", **stage) -> Path:
    path = tmp_path / "recipe.yaml"
    data = {"path": str(DATA / ("sft.jsonl" if kind == "sft" else "preferences.jsonl")), "max_rows": 16}
    path.write_text(yaml.safe_dump({"name": "qlora", "output_dir": str(tmp_path / "out"), "stages": {
        kind: {"kind": kind, "model": policy, "lora": lora, "data": data,
               "train": {"max_steps": 4, "batch_size": 4, "max_length": 64, "logging_steps": 1,
                                              "learning_rate": 1e-3}, **stage}}}))
    return path


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(models, "_cuda", lambda: False)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_quantize_without_a_cuda_gpu_is_a_recipe_error_before_anything_loads(command, no_gpu, tmp_path, capsys):
    recipe = sft_recipe(tmp_path, str(tmp_path / "no-model-needed"), {"r": 4, "quantize": "4bit"})
    (tmp_path / "no-model-needed").mkdir()
    assert main([command, str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {recipe}:") and "stages.sft.lora.quantize: " in err and "CUDA GPU" in err, err
    assert "fix: remove `quantize`" in err, err
    assert not (tmp_path / "out").exists()  # refused before the output folder (or a model) was touched


def test_quantize_without_bitsandbytes_names_the_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(models, "_cuda", lambda: True)
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "bitsandbytes" else found(name, *rest))
    (tmp_path / "m").mkdir()
    assert main(["validate", str(sft_recipe(tmp_path, str(tmp_path / "m"), {"quantize": "8bit"}))]) == 2
    err = capsys.readouterr().err
    assert "stages.sft.lora.quantize" in err and "bitsandbytes package, which is not installed" in err, err
    assert "pip install bitsandbytes" in err


def test_quantize_on_a_kind_that_does_not_take_it_lists_those_that_do(no_gpu, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    recipe = sft_recipe(tmp_path, str(tmp_path / "m"), {"quantize": "4bit"}, kind="reward")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "stages.reward.lora.quantize" in err and "applies to sft, dpo, ipo, cpo, simpo, orpo, kto" in err, err


def test_quantize_from_a_gguf_file_is_refused(monkeypatch):
    monkeypatch.setattr(models, "_cuda", lambda: True)
    problem = models.quantize_problem(schema.LoraSection(quantize="4bit"),
                                      schema.ModelSection(path="m", gguf_file="m.gguf"))
    assert problem is not None and "GGUF" in problem[0]


def test_bitsandbytes_settings():
    import torch

    four = models.quantization_config("4bit")
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype in (torch.bfloat16, torch.float16)
    assert models.quantization_config("8bit").load_in_8bit


def test_a_lora_section_without_quantize_dumps_as_before():
    """Stages that do not set `quantize` keep their fingerprints: the field is left out of the dump when null."""
    assert "quantize" not in schema.LoraSection().model_dump(mode="json")
    assert schema.LoraSection(quantize="4bit").model_dump(mode="json")["quantize"] == "4bit"
    with pytest.raises(ValueError):
        schema.LoraSection(quantize="2bit")


def test_an_adapter_is_refused_as_a_quantized_base(monkeypatch, tmp_path):
    from pipeline.errors import PipelineError

    monkeypatch.setattr(models, "quantize_problem", lambda lora, model: None)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(PipelineError, match="merge it first"):
        models.load_causal_lm(str(tmp_path), schema.ModelSection(path=str(tmp_path)), quantize="4bit")


# ------------------------------------------------------------------------------------------------------ CUDA


def tiny_policy(folder: Path) -> Path:
    """A tiny ChatML tokenizer and Llama policy (sizes bitsandbytes quantizes in blocks of 64)."""
    from tiny_models import save_tiny_chat_model

    texts = [row["prompt"] + " " + row["completion"] for row in map(json.loads, open(DATA / "sft.jsonl"))]
    return save_tiny_chat_model(folder, texts, hidden=64, intermediate=128, layers=2)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_sft_trains_on_cuda_and_its_artifacts_load(bits, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("bitsandbytes")
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from pipeline import runner
    from pipeline.recipe import load_recipe

    policy = tiny_policy(tmp_path / "policy")
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "quantize": bits}
    recipe = sft_recipe(tmp_path, str(policy), lora, data={"path": str(DATA / "sft.jsonl"), "max_rows": 16,
                                                           "eval_path": str(DATA / "sft_eval.jsonl"),
                                                           "max_eval_rows": 4})
    artifact = runner.run_recipe(load_recipe(recipe))["sft"]
    assert (artifact.path / "adapter_model.safetensors").exists() and artifact.manifest["config"]["lora"]["quantize"]
    metrics = artifact.manifest["metrics"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    adapter = AutoPeftModelForCausalLM.from_pretrained(artifact.path)  # the stock class, on the unquantized base
    assert not getattr(adapter, "is_loaded_in_4bit", False) and not getattr(adapter, "is_loaded_in_8bit", False)
    assert any("lora_B" in name and torch.count_nonzero(p) for name, p in adapter.named_parameters())

    (tmp_path / "merged").mkdir()
    merged = runner.run_recipe(load_recipe(sft_recipe(tmp_path / "merged", str(policy), {**lora, "merge": True})))
    merged = merged["sft"]
    assert not (merged.path / "adapter_config.json").exists() and (merged.path / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((merged.path / "config.json").read_text())
    assert AutoModelForCausalLM.from_pretrained(merged.path).config.vocab_size == adapter.config.vocab_size
