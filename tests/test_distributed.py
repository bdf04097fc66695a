"""Two-process runs on CPU (gloo): a tokenizer -> pretrain -> sft chain launched with torchrun, plus the rank-agreement
checks as unit tests. In the default suite (about 30 s on 2 cores):

    pytest tests/test_distributed.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import parallel
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
BATCH, MAX_LENGTH, WORLD = 4, 64, 2

RECIPE = f"""
name: tiny-dist
output_dir: {{out}}
seed: 0
defaults:
  train: {{{{max_length: {MAX_LENGTH}, logging_steps: 1, save_steps: 100, batch_size: {BATCH}, learning_rate: 1.0e-3,
           max_steps: 3}}}}
stages:
  tokenizer:
    kind: tokenizer
    data: {{{{path: {{data}}/corpus.jsonl, max_rows: 300}}}}
    vocab_size: 300
  base:
    kind: pretrain
    tokenizer: ${{{{tokenizer}}}}
    model:
      architecture: llama
      config: {{{{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
               num_key_value_heads: 1, max_position_embeddings: 64, tie_word_embeddings: true}}}}
    data: {{{{path: {{data}}/corpus.jsonl, max_rows: 200}}}}
  sft:
    kind: sft
    model: ${{{{base}}}}
    data: {{{{path: {{data}}/sft.jsonl, max_rows: 64}}}}
"""


def _launch(recipe: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_XET": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(WORLD), "-m", "pipeline", "run", str(recipe)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Run the chain once with two processes, then again (which must skip everything)."""
    folder = tmp_path_factory.mktemp("dist")
    data = folder / "data"  # a private copy: data/ may be regenerated while this runs
    data.mkdir()
    for name in ("corpus.jsonl", "sft.jsonl"):
        shutil.copy(ROOT / "data" / name, data / name)
    recipe = folder / "tiny.yaml"
    recipe.write_text(RECIPE.format(out=folder / "out", data=data))
    first = _launch(recipe)
    second = _launch(recipe)
    return SimpleNamespace(out=folder / "out", first=first.stdout + first.stderr, second=second.stdout)


@pytest.mark.distributed
def test_both_ranks_ran_and_manifest_records_world_size(two_process_run):
    for rank in range(WORLD):
        assert f"[rank {rank}/{WORLD}] tiny-dist: DistributedType.MULTI_CPU" in two_process_run.first
    for stage in ("tokenizer", "base", "sft"):
        manifest = json.loads((two_process_run.out / stage / "manifest.json").read_text())
        assert manifest["complete"] and manifest["world_size"] == WORLD
        # rank 0 alone prints progress: each stage starts exactly once in the log
        assert two_process_run.first.count(f"{stage} ({manifest['kind']}): running") == 1


@pytest.mark.distributed
def test_trainer_sharded_the_data(two_process_run):
    """Packed pretraining: the first step's token count (summed over ranks) exceeds what one rank's batch holds."""
    manifest = json.loads((two_process_run.out / "base" / "manifest.json").read_text())
    first_step = next(e for e in manifest["log_history"] if "num_tokens" in e)
    assert BATCH * MAX_LENGTH < first_step["num_tokens"] <= WORLD * BATCH * MAX_LENGTH


@pytest.mark.distributed
def test_artifacts_are_whole_and_load(two_process_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = two_process_run.out
    assert not list(out.glob(".tmp/*")) and not list(out.glob(".work/*"))  # no partial or replaced folders
    assert not [p for p in out.rglob("*.tmp") if p.is_file()]  # no half-written json
    tokenizer = AutoTokenizer.from_pretrained(out / "sft")
    model = AutoModelForCausalLM.from_pretrained(out / "sft")
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tokenizer)
    tokenizer_manifest = json.loads((out / "tokenizer" / "manifest.json").read_text())
    assert tokenizer_manifest["metrics"]["vocab_size"] == len(tokenizer)  # sft carries the trained tokenizer


@pytest.mark.distributed
def test_rerun_skips_every_stage(two_process_run):
    for stage in ("tokenizer", "base", "sft"):
        assert f"{stage} (" in two_process_run.second and "up to date, skipped" in two_process_run.second
    assert "running" not in two_process_run.second
    assert two_process_run.second.count("up to date, skipped") == 3  # printed by rank 0 only


# ------------------------------------------------------------------------------------------ rank agreement (unit)


def _fake_state(n: int):
    return SimpleNamespace(num_processes=n)


def test_ranks_that_agree_pass(monkeypatch):
    monkeypatch.setattr(parallel, "gather", lambda state, value: [value] * state.num_processes)
    parallel.check_ranks_agree(_fake_state(2), "fingerprints", ["abc", True])


def test_ranks_that_disagree_raise(monkeypatch):
    monkeypatch.setattr(parallel, "gather", lambda state, value: [value, "other"])
    with pytest.raises(PipelineError, match="ranks disagree on the files of artifact 'sft'.*rank 1: \"other\""):
        parallel.check_ranks_agree(_fake_state(2), "the files of artifact 'sft'", "mine", key="stages.sft")


def test_single_process_gather_needs_no_backend():
    assert parallel.gather(_fake_state(1), {"a": 1}) == [{"a": 1}]


def test_weights_digest_sees_one_changed_value():
    import torch

    model = torch.nn.Linear(3, 2)
    before = parallel.weights_digest(model)
    assert parallel.weights_digest(model) == before
    with torch.no_grad():
        model.weight[0, 0] += 1e-3
    assert parallel.weights_digest(model) != before


def test_files_digest_covers_names_and_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"123")
    before = parallel.files_digest(tmp_path)
    (tmp_path / "b.bin").write_bytes(b"")
    assert parallel.files_digest(tmp_path) != before


# ------------------------------------------------------------------------------------ parallelism: section (unit)


def _section(**sizes):
    from pipeline.schema import ParallelismSection

    return ParallelismSection(**sizes)


def test_dp_shard_minus_one_takes_the_rest():
    assert parallel.resolve_sizes(_section(dp_shard=-1, tp=2), 8) == {"dp_replicate": 1, "dp_shard": 4, "tp": 2,
                                                                      "cp": 1}


@pytest.mark.parametrize("sizes,world", [({"dp_shard": 2, "tp": 2}, 2), ({"dp_shard": -1, "tp": 3}, 4),
                                         ({"dp_replicate": 2, "dp_shard": 2}, 8)])
def test_sizes_that_do_not_fit_the_world_are_a_clear_error(sizes, world):
    with pytest.raises(PipelineError, match=f"do not fit {world} process") as info:
        parallel.resolve_sizes(_section(**sizes), world)
    assert info.value.key == "parallelism"


def test_parallelism_config_gets_the_recipe_sizes():
    config = parallel.parallelism_config(_section(dp_replicate=2, dp_shard=2, tp=2, cp=1), 8)
    assert (config.dp_replicate_size, config.dp_shard_size, config.tp_size, config.cp_size) == (2, 2, 2, 1)
    assert config.total_size == 8


def test_nothing_to_configure_gives_none():
    assert parallel.parallelism_config(None, 4) is None
    assert parallel.parallelism_config(_section(), 1) is None
    assert parallel.parallelism_config(_section(dp_replicate=4), 4) is None  # plain DDP


def _ctx(tmp_path, parallelism, world):
    from contexts import stage_ctx

    section = {} if parallelism is None else {"parallelism": parallelism.model_dump(exclude_unset=True)}
    return stage_ctx(tmp_path, {"kind": "sft", "model": "m"}, world=world, name="sft", **section)


def test_trainer_kwargs_pass_the_parallelism_config(tmp_path):
    from pipeline import training
    from pipeline.schema import TrainSection

    kwargs = training.trainer_kwargs(_ctx(tmp_path, _section(dp_shard=-1, tp=2), 4), TrainSection())
    assert kwargs["parallelism_config"].dp_shard_size == 2 and kwargs["parallelism_config"].tp_size == 2
    assert "parallelism_config" not in training.trainer_kwargs(_ctx(tmp_path, None, 1), TrainSection())
    with pytest.raises(PipelineError, match="do not fit 3"):
        training.trainer_kwargs(_ctx(tmp_path, _section(dp_shard=2), 3), TrainSection())


def test_liger_without_its_package_is_a_clear_error(tmp_path):
    import importlib.util

    from pipeline import training
    from pipeline.schema import TrainSection

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(PipelineError, match="liger-kernel package is not installed"):
        training.trainer_kwargs(_ctx(tmp_path, None, 1), TrainSection(use_liger_kernel=True))


def test_sft_packs_padding_free_only_with_flash_attention():
    from pipeline.stages.sft import packing_strategy

    def model(attn):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=attn))

    assert packing_strategy(model("flash_attention_2")) == "bfd"
    assert packing_strategy(model("sdpa")) == "wrapped" and packing_strategy(model("eager")) == "wrapped"


def test_sft_packs_by_default_only_where_packing_is_padding_free():
    from pipeline.stages.sft import use_packing

    def model(attn):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=attn))

    assert use_packing(None, model("flash_attention_2")) is True
    assert use_packing(None, model("sdpa")) is False
    assert use_packing(True, model("sdpa")) is True and use_packing(False, model("flash_attention_2")) is False
