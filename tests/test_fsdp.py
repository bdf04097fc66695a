"""FSDP2 on two CPU processes (gloo): the same chain as a DDP run must write the same weights, gathered from the
shards by a collective save (full SFT, LoRA merged into full weights, a LoRA reward model merged); a `ppo` stage
refuses a sharded launch with a one-line error and trains data-parallel under DDP. In the default suite (about 70 s
on 2 cores):

    pytest tests/test_fsdp.py

Accelerate will not start FSDP on CPU by itself, so the FSDP launch puts `tests/fsdp_on_cpu/` (a sitecustomize
that does what Accelerate does on GPUs: switch the state to FSDP) first on PYTHONPATH; torch's FSDP2 itself runs
unchanged over gloo.
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
HOOK = Path(__file__).resolve().parent / "fsdp_on_cpu"
ACCELERATE = Path(sys.executable).with_name("accelerate")
STAGES = ("base", "sft", "sft_lora", "rm", "dpo")  # deterministic: FSDP must match DDP

CHAIN = """
name: tiny-fsdp
output_dir: {out}
seed: 0
defaults:
  train: {{max_length: 64, logging_steps: 1, save_steps: 100, batch_size: 4, learning_rate: 1.0e-3, max_steps: 3}}
stages:
  tokenizer:
    kind: tokenizer
    data: {{path: {data}/corpus.jsonl, max_rows: 300}}
    vocab_size: 300
  base:
    kind: pretrain
    tokenizer: ${{tokenizer}}
    model:
      architecture: llama
      config: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2,
               num_key_value_heads: 1, max_position_embeddings: 64, tie_word_embeddings: true}}
    data: {{path: {data}/corpus.jsonl, max_rows: 200}}
  sft:
    kind: sft
    model: ${{base}}
    data: {{path: {data}/sft.jsonl, max_rows: 64}}
  sft_lora:
    kind: sft
    model: ${{base}}
    data: {{path: {data}/sft.jsonl, max_rows: 64}}
    lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj], merge: true}}
  rm:
    kind: reward
    model: ${{base}}
    data: {{path: {data}/preferences.jsonl, max_rows: 32}}
    lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
  dpo:
    kind: dpo
    model: ${{sft}}
    data: {{path: {data}/preferences.jsonl, max_rows: 32}}
  grpo:
    kind: grpo
    model: ${{sft}}
    reward_model: ${{rm}}
    data: {{path: {data}/prompts.jsonl, max_rows: 16}}
    num_generations: 2
    max_new_tokens: 4
    eval_prompts: 4
    train: {{max_steps: 2}}
"""
PPO = """
  ppo:
    kind: ppo
    model: ${{sft}}
    reward_model: ${{rm}}
    data: {{path: {data}/prompts.jsonl, max_rows: 16}}
    total_episodes: 8
    rollout_batch_size: 4
    mini_batch_size: 4
    max_new_tokens: 4
    train: {{save_steps: 1}}
  ppo_lora:
    kind: ppo
    model: ${{sft}}
    reward_model: ${{rm}}
    lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
    data: {{path: {data}/prompts.jsonl, max_rows: 16}}
    total_episodes: 8
    rollout_batch_size: 4
    mini_batch_size: 4
    max_new_tokens: 4
  ppo_value_head:
    kind: ppo
    model: ${{sft}}
    reward_model: ${{rm}}
    value_head: true
    data: {{path: {data}/prompts.jsonl, max_rows: 16}}
    total_episodes: 4
    rollout_batch_size: 4
    mini_batch_size: 4
    max_new_tokens: 4
"""


def _launch(config: Path, recipe: Path, *, fsdp: bool, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_XET": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **extra_env}
    if fsdp:
        env.update(PIPELINE_TEST_FSDP_ON_CPU="1", PYTHONPATH=os.pathsep.join([str(HOOK), str(ROOT)]))
    command = [str(ACCELERATE), "launch", "--config_file", str(config), "-m", "pipeline", "run", str(recipe)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The chain followed by three ppo stages, under DDP and under FSDP2. The FSDP launch is killed right after
    ppo's first checkpoint and launched again (it must resume), then stops at ppo_value_head, which FSDP refuses."""
    folder = tmp_path_factory.mktemp("fsdp")
    data = folder / "data"  # a private copy: data/ may be regenerated while this runs
    data.mkdir()
    for name in ("corpus.jsonl", "sft.jsonl", "preferences.jsonl", "prompts.jsonl"):
        shutil.copy(ROOT / "data" / name, data / name)
    fsdp_recipe, ddp_recipe = folder / "fsdp.yaml", folder / "ddp.yaml"
    fsdp_recipe.write_text(CHAIN.format(out=folder / "fsdp", data=data) + PPO.format(data=data))
    ddp_recipe.write_text(CHAIN.format(out=folder / "ddp", data=data) + PPO.format(data=data))
    killed = _launch(HOOK / "accelerate_fsdp2.yaml", fsdp_recipe, fsdp=True, PIPELINE_TEST_KILL_AT="ppo:1")
    checkpoints = list((folder / "fsdp" / ".work").glob("ppo-*/ppo-checkpoint.pt"))
    fsdp = _launch(HOOK / "accelerate_fsdp2.yaml", fsdp_recipe, fsdp=True)
    ddp = _launch(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml", ddp_recipe, fsdp=False)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    return SimpleNamespace(fsdp=folder / "fsdp", ddp=folder / "ddp", fsdp_log=fsdp.stdout + fsdp.stderr,
                           fsdp_code=fsdp.returncode, killed_code=killed.returncode, checkpoints=checkpoints)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.distributed
def test_the_chain_trained_under_fsdp(runs):
    for stage in STAGES:
        manifest = json.loads((runs.fsdp / stage / "manifest.json").read_text())
        assert manifest["complete"] and manifest["world_size"] == 2, stage
        assert manifest["distributed_type"] == "FSDP", stage
        ddp = json.loads((runs.ddp / stage / "manifest.json").read_text())
        assert ddp["distributed_type"] == "MULTI_CPU", stage


@pytest.mark.distributed
@pytest.mark.parametrize("stage", STAGES)
def test_fsdp_gathers_the_same_weights_as_ddp(runs, stage):
    """Gathered shards equal DDP's whole weights: not one rank's shard, not the starting weights."""
    sharded, whole = _weights(runs.fsdp / stage), _weights(runs.ddp / stage)
    assert set(sharded) == set(whole)  # incl. no untied copy of the tied embedding (tie_word_embeddings: true)
    for name, tensor in whole.items():
        assert sharded[name].shape == tensor.shape, name
        assert (sharded[name].float() - tensor.float()).abs().max().item() < 1e-5, name


@pytest.mark.distributed
def test_grpo_trains_under_fsdp(runs):
    """TRL's GRPO under FSDP2: sampled, so not compared with DDP weight by weight; it completes, saves whole
    weights, and they load."""
    from transformers import AutoModelForCausalLM

    manifest = json.loads((runs.fsdp / "grpo" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["distributed_type"] == "FSDP"
    model = AutoModelForCausalLM.from_pretrained(runs.fsdp / "grpo")
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(runs.ddp / "grpo").parameters())


@pytest.mark.distributed
def test_training_moved_the_weights(runs):
    base, sft = _weights(runs.fsdp / "base"), _weights(runs.fsdp / "sft")
    assert max((base[k] - sft[k]).abs().max().item() for k in base) > 1e-4


@pytest.mark.distributed
def test_sharded_artifacts_load_and_hold_no_pickle(runs):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for stage in STAGES:
        names = {p.name for p in (runs.fsdp / stage).iterdir()}
        assert "training_args.bin" not in names and not names & {"adapter_config.json", "adapter_model.safetensors"}
    assert AutoModelForCausalLM.from_pretrained(runs.fsdp / "sft_lora").config.hidden_size == 32
    reward = AutoModelForSequenceClassification.from_pretrained(runs.fsdp / "rm")
    assert reward.config.num_labels == 1 and reward.config.pad_token_id is not None


@pytest.mark.distributed
def test_ppo_under_fsdp_resumes_from_a_gathered_checkpoint(runs):
    """Killed after step 1's checkpoint (gathered from both ranks' shards), the rerun loads it (broadcast from rank
    0 into the shards) and finishes: the log history runs 1, 2 with no step repeated."""
    assert runs.killed_code != 0 and len(runs.checkpoints) == 1
    assert "ppo: resumed from its checkpoint at step 1" in runs.fsdp_log
    manifest = json.loads((runs.fsdp / "ppo" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["distributed_type"] == "FSDP"
    assert [e["step"] for e in manifest["log_history"] if "reward/mean" in e] == [1, 2]
    assert manifest["metrics"]["episodes"] == 8


@pytest.mark.distributed
def test_ppo_under_fsdp_saves_whole_weights(runs):
    from peft import AutoPeftModelForCausalLM

    sft, ppo, ddp = _weights(runs.fsdp / "sft"), _weights(runs.fsdp / "ppo"), _weights(runs.ddp / "ppo")
    assert set(ppo) == set(ddp) and all(ppo[k].shape == sft[k].shape for k in sft)  # whole, not one rank's shard
    assert max((ppo[k] - sft[k]).abs().max().item() for k in sft) > 1e-5  # PPO moved the policy
    # same seeds, prompts and rollouts: FSDP (killed and resumed) ends where uninterrupted DDP does
    print("ppo fsdp-vs-ddp max diff", max((ppo[k] - ddp[k]).abs().max().item() for k in ddp))
    assert max((ppo[k] - ddp[k]).abs().max().item() for k in ddp) < 1e-4
    adapter = runs.fsdp / "ppo_lora"
    assert (adapter / "adapter_model.safetensors").exists()
    assert json.loads((adapter / "manifest.json").read_text())["distributed_type"] == "FSDP"
    assert AutoPeftModelForCausalLM.from_pretrained(adapter) is not None


@pytest.mark.distributed
def test_ppo_value_head_is_refused_under_fsdp_with_one_line(runs):
    assert runs.fsdp_code != 0
    assert "stages.ppo_value_head.value_head: value_head: true shares the policy's trunk" in runs.fsdp_log
    assert "[rank0]: Traceback" not in runs.fsdp_log and "[rank1]: Traceback" not in runs.fsdp_log  # one line each
    assert runs.fsdp_log.count("shares the policy's trunk") == 2  # both ranks stop, neither hangs
    assert not (runs.fsdp / "ppo_value_head").exists()
    assert json.loads((runs.ddp / "ppo_value_head" / "manifest.json").read_text())["complete"]  # fine under DDP


def _section(**sizes):
    from pipeline.schema import ParallelismSection

    return ParallelismSection(**sizes)


def test_sharding_is_read_from_the_launch_environment():
    assert parallel.sharding_in_launch(None, {"ACCELERATE_USE_FSDP": "true"}) == "FSDP"
    zero = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    assert parallel.sharding_in_launch(None, zero) == "DeepSpeed ZeRO-3"
    assert parallel.sharding_in_launch(None, {**zero, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}) is None
    assert parallel.sharding_in_launch(_section(tp=2), {}) == "parallelism tp=2"
    assert parallel.sharding_in_launch(_section(dp_replicate=2), {}) is None


@pytest.mark.distributed
def test_ppo_trains_data_parallel_under_ddp(runs):
    """Two ranks, rollout batch 4: two steps of 2 prompts per rank; the runner checked that both ranks ended with
    the same policy (the run fails otherwise), and the logged statistics cover the global batch."""
    manifest = json.loads((runs.ddp / "ppo" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["world_size"] == 2 and manifest["distributed_type"] == "MULTI_CPU"
    assert manifest["metrics"]["steps"] == 2 and manifest["metrics"]["episodes"] == 8
    steps = [e for e in manifest["log_history"] if "reward/mean" in e]
    assert len(steps) == 2 and all(0.0 <= e["eos_fraction"] <= 1.0 for e in steps)


def _picker(rank: int, world: int, rows: int = 10, batch: int = 4):
    import torch

    from pipeline.rl.trainer import PPOTrainer

    state = SimpleNamespace(cfg=SimpleNamespace(rollout_batch_size=batch), rows=list(range(rows)), order=[],
                            order_gen=torch.Generator().manual_seed(0), rank=rank, world=world)
    return lambda: PPOTrainer._next_rows(state)


def test_ppo_ranks_sample_disjoint_shares_of_the_global_batch():
    single, rank0, rank1 = _picker(0, 1), _picker(0, 2), _picker(1, 2)
    for _ in range(5):  # across reshuffles of the 10 prompts
        whole, first, second = single(), rank0(), rank1()
        assert len(first) == len(second) == 2 and not set(first) & set(second)
        assert sorted(first + second) == sorted(whole)


def test_ppo_batches_must_split_over_the_ranks():
    from pipeline.stages.ppo import check_batches_split

    ctx = SimpleNamespace(name="ppo", state=SimpleNamespace(num_processes=4),
                          config=SimpleNamespace(rollout_batch_size=16, mini_batch_size=6))
    with pytest.raises(PipelineError, match="mini_batch_size 6 does not split over 4 processes") as info:
        check_batches_split(ctx)
    assert info.value.key == "stages.ppo.mini_batch_size"
    ctx.config.mini_batch_size = 8
    check_batches_split(ctx)


# ------------------------------------------------------------------------------------------- tensor parallel (load)


@pytest.mark.distributed
def test_tensor_parallel_load_splits_weights_and_keeps_the_loss(tmp_path):
    """`parallelism: {tp: 2}` loads models through `load_causal_lm(tp_size=2)`: each rank holds half of every
    attention projection and the loss equals the whole model's. (Training under TP goes through Accelerate, which
    starts a ParallelismConfig on GPUs only, so this part is tested at the load/forward/backward level.)"""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).with_name("tp_forward.py")), str(tmp_path), str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for rank in ranks:
        assert rank["tp_size"] == 2 and rank["grad_finite"]
        assert rank["local_shape"] == [32, 64] and rank["full_shape"] == [64, 64]
        assert abs(rank["loss"] - rank["whole_loss"]) < 1e-5


def test_tensor_parallel_size_comes_from_the_recipe(tmp_path):
    from contexts import stage_ctx

    def ctx(section, world):
        header = {} if section is None else {"parallelism": section.model_dump(exclude_unset=True)}
        return stage_ctx(tmp_path, {"kind": "sft", "model": "m"}, world=world, **header)

    assert parallel.tensor_parallel_size(ctx(_section(dp_shard=-1, tp=2), 4)) == 2
    assert parallel.tensor_parallel_size(ctx(_section(tp=2), 1)) == 1  # one process: nothing to split
    assert parallel.tensor_parallel_size(ctx(None, 4)) == 1


def test_a_sharding_parallelism_section_on_cpu_stops_before_any_stage():
    import torch

    cpu = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    with pytest.raises(PipelineError, match="Accelerate runs on GPUs only") as info:
        parallel.check_launch(_section(tp=2), cpu, recipe_file="r.yaml")
    assert info.value.key == "parallelism" and info.value.file == "r.yaml"
    parallel.check_launch(_section(dp_replicate=2), cpu)  # plain DDP needs no accelerator
    parallel.check_launch(_section(tp=2), SimpleNamespace(num_processes=2, device=torch.device("cuda", 0)))
    with pytest.raises(PipelineError, match="do not fit 2 process") as info:
        parallel.check_launch(_section(tp=4), SimpleNamespace(num_processes=2, device=torch.device("cuda", 0)),
                              recipe_file="r.yaml")
    assert info.value.file == "r.yaml"
