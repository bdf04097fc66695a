"""Every malformed recipe in tests/bad_recipes/ fails with exit code 2 and one clear line naming the file, the key
path and the fix; nothing is written and no traceback is shown. Each file states what it expects in its first lines:

    # expect: <substring of the error message>
    # key: <key path named in the error>          (absent for whole-file errors such as invalid YAML)
    # args: <command-line overrides>              (optional)

Run: `pytest tests/test_bad_recipes.py` (in-process CLI calls, a few seconds; one subprocess for the python tag).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipeline.__main__ import main
from resilience_common import ROOT, cli

BAD = sorted((ROOT / "tests" / "bad_recipes").glob("*.yaml"))


def _spec(path: Path) -> dict[str, str]:
    spec = {}
    for line in path.read_text().splitlines():
        match = re.match(r"# (expect|key|args): (.*)$", line)
        if not match:
            break
        spec[match.group(1)] = match.group(2)
    return spec


def _outputs() -> set[str]:
    folder = ROOT / "outputs"
    return {str(p) for p in folder.iterdir()} if folder.exists() else set()


def test_corpus_is_large_enough():
    assert len(BAD) >= 30
    assert all("expect" in _spec(p) for p in BAD), "every bad recipe states the error it expects"


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_recipe_fails_clearly(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = _spec(path)
    before = _outputs()
    code = main(["run", str(path.relative_to(ROOT)), *shlex.split(spec.get("args", ""))])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert path.name in err
    assert spec["expect"] in err, err
    if "key" in spec:
        assert f"{spec['key']}:" in err, err
    assert "fix:" in err, err
    assert "Traceback" not in err
    assert _outputs() == before, "a failed check must not write anything"


def test_python_tags_cannot_run_code(tmp_path):
    """The safe loader refuses !!python tags at the CLI: no code runs, exit 2, one line, no traceback."""
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\nstages: {{}}\n')
    result = cli("validate", str(recipe))
    assert result.returncode == 2
    assert "could not determine a constructor" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("stem", ["missing_columns", "lora_bad_target", "max_length_too_long", "no_chat_template",
                                  "reward_tokenizer_mismatch"])
def test_validate_deep_runs_the_same_checks(stem, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = f"tests/bad_recipes/{stem}.yaml"
    assert main(["validate", path]) == 0, "schema-valid: only the deep checks catch it"
    capsys.readouterr()
    assert main(["validate", "--deep", path]) == 2
    assert _spec(ROOT / path)["expect"] in capsys.readouterr().err


SHIPPED = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "stages:" in p.read_text())


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_recipes_pass_deep_checks(path, monkeypatch, capsys):
    """The deep checks must not reject a good recipe (no false alarms)."""
    monkeypatch.chdir(ROOT)
    assert main(["validate", "--deep", str(path.relative_to(ROOT))]) == 0, capsys.readouterr().err


def _model_folder(folder: Path, config: dict, chat_template: bool) -> Path:
    import json

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, str(folder): 1}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"} if chat_template else {}))
    return folder


def _deep(tmp_path, stage: dict) -> str:
    import yaml

    from pipeline import preflight
    from pipeline.errors import PipelineError
    from pipeline.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "output_dir": str(tmp_path / "out"), "stages": stage}))
    with pytest.raises(PipelineError) as info:
        preflight.check(load_recipe(path))
    assert not (tmp_path / "out").exists()
    return info.value.render()


def test_existing_folders_are_checked(tmp_path):
    data = {"path": str(ROOT / "data/sft.jsonl")}
    plain = _model_folder(tmp_path / "plain", {"model_type": "llama", "max_position_embeddings": 64}, False)
    assert "has no chat template" in _deep(tmp_path, {"sft": {"kind": "sft", "model": str(plain), "data": data}})
    gpt2 = _model_folder(tmp_path / "gpt2", {"model_type": "gpt2", "n_positions": 32}, True)
    error = _deep(tmp_path, {"sft": {"kind": "sft", "model": str(gpt2), "data": data,
                                     "lora": {"target_modules": ["q_proj"]}}})
    assert "stages.sft.lora.target_modules" in error and "c_attn" in error
    error = _deep(tmp_path, {"sft": {"kind": "sft", "model": str(gpt2), "data": data, "train": {"max_length": 64}}})
    assert "exceeds the model's 32 positions" in error


def test_reward_and_policy_folders_with_different_vocab(tmp_path):
    policy = _model_folder(tmp_path / "policy", {"model_type": "llama"}, True)
    reward = _model_folder(tmp_path / "reward", {"model_type": "llama"}, True)
    error = _deep(tmp_path, {"grpo": {"kind": "grpo", "model": str(policy), "reward_model": str(reward),
                                      "data": {"path": str(ROOT / "data/prompts.jsonl")}}})
    assert "stages.grpo.reward_model" in error and "differs from the policy's" in error


def test_fp16_without_a_gpu_is_refused_before_any_stage_runs(tmp_path, capsys, monkeypatch):
    """`mixed_precision: fp16` on a machine without CUDA: exit 2, one line naming the recipe and the stage's key,
    before the first stage (which here would have trained) runs or anything is written."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks a machine without a CUDA GPU")
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "fp16.yaml"
    text = (ROOT / "tests" / "bad_recipes" / "bad_literal_precision.yaml").read_text()
    recipe.write_text(text.replace("mixed_precision: fp8", "mixed_precision: fp16")
                      .replace("name: bad", f"name: fp16\noutput_dir: {tmp_path / 'out'}"))
    code = main(["run", str(recipe)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "fp16.yaml" in err and "stages.sft.train.mixed_precision:" in err and "fix:" in err, err
    assert not (tmp_path / "out").exists()
