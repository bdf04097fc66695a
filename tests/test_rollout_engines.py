"""The rollout engine setting without a vLLM server (fast, default suite): the schema's `rollout:` section and its
refusals, the server's command line and environment, the seeds, LoRA weights merged for the server without
touching the policy, and a missing vLLM interpreter refused before anything trains. The server itself is tested
in tests/test_vllm_rollouts.py.

Run: .venv/bin/python -m pytest tests/test_rollout_engines.py -q
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from pipeline import schema
from pipeline.rl import engines
from pipeline.rl.vllm_server import ServerSpec, command, lora_rank_flag, server_env

ROOT = Path(__file__).resolve().parents[1]


def online(kind: str, **rollout):
    cls = {"grpo": schema.GrpoStage, "rloo": schema.RlooStage}[kind]
    return cls(kind=kind, model="m", data={"path": "d.jsonl"}, rewards=[{"type": "exact_match"}], rollout=rollout)


def test_hf_is_the_default_and_leaves_the_stage_config_as_it_was():
    stage = online("grpo")
    assert stage.rollout.engine == "hf"
    assert "rollout" not in stage.model_dump()  # the fingerprint of every existing recipe is unchanged
    assert online("grpo", engine="vllm").model_dump()["rollout"]["engine"] == "vllm"


def test_rloo_refuses_vllm_and_grpo_refuses_ppos_importance_correction():
    with pytest.raises(ValidationError, match="RLOOTrainer takes no rollout function"):
        online("rloo", engine="vllm")
    with pytest.raises(ValidationError, match="importance_correction is ppo's"):
        online("grpo", engine="vllm", importance_correction=True)


def test_the_server_command_line():
    spec = ServerSpec(model="/m", python="/env/bin/python", log_path=Path("/tmp/x.log"), key="k", lora_rank=12,
                      server_args=["--enable-prefix-caching"], max_model_len=300, threads=2)
    cmd = command(spec, 8123)
    assert cmd[:3] == ["/env/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for flag in ("--port 8123", "--host 127.0.0.1", "--max-model-len 300", "--logprobs-mode processed_logprobs",
                 "--enable-lora", "--max-lora-rank 16", "--enforce-eager"):
        assert flag in joined
    assert cmd[-1] == "--enable-prefix-caching"
    assert "--enable-lora" not in command(ServerSpec(model="/m", python="p", log_path=Path("l"), key="k"), 1)
    env = server_env(spec)
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["OMP_NUM_THREADS"] == "2"
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env  # not our environment's packages
    assert [lora_rank_flag(r) for r in (1, 2, 8, 9, 64)] == [1, 8, 8, 16, 64]


def test_step_seeds_differ_across_prompts_steps_and_ranks_and_repeat_on_a_rerun():
    one = engines.step_seeds(0, 3, 8)
    assert len(set(one)) == 8 and one == engines.step_seeds(0, 3, 8)
    assert not set(one) & set(engines.step_seeds(0, 4, 8))
    rank0, rank1 = engines.step_seeds(0, 3, 4, rank=0, world=2), engines.step_seeds(0, 3, 4, rank=1, world=2)
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(one)  # two ranks draw the seeds one process would


def test_merged_weights_of_a_lora_policy_are_merge_and_unloads_and_leave_it_unmerged(tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    merged = engines.merged_weights(policy)
    want = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert set(merged) == set(want) - {"lm_head.weight"}  # tied to the embeddings: kept once
    for key, value in merged.items():
        assert torch.allclose(value, want[key], atol=1e-6), key
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())  # the policy is untouched


def test_a_missing_vllm_interpreter_is_refused_before_training(tmp_path):
    stage = {"kind": "grpo", "model": "m", "data": {"path": str(ROOT / "data/prompts.jsonl")},
             "rewards": [{"type": "exact_match"}], "rollout": {"engine": "vllm", "python": str(tmp_path / "nope")}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "output_dir": str(tmp_path / "out"), "stages": {"grpo": stage}}))
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate", "--deep", str(recipe)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "stages.grpo.rollout.python" in line and "requirements/vllm.sh" in line and str(recipe) in line
    assert not (tmp_path / "out").exists()


def test_a_failed_request_names_the_error_the_servers_log_ends_with(tmp_path):
    from pipeline.errors import TrainingError
    from pipeline.rl.engines import VLLMEngine
    from pipeline.rl.vllm_server import VLLMServer

    log = tmp_path / "vllm-server.log"
    log.write_text("(Worker pid=1) ERROR [multiproc_executor.py:1063] Traceback (most recent call last):\n"
                   "(Worker pid=1) ERROR [multiproc_executor.py:1063] RuntimeError: Unsupported CPU attention "
                   "configuration: head_dim=16\n"
                   "(APIServer pid=2) ERROR [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: "
                   "EngineCore encountered an issue. See stack trace (above) for the root cause.\n")
    server = VLLMServer(ServerSpec(model="/m", python="p", log_path=log, key="stages.ppo.rollout"))
    assert server.root_cause() == "RuntimeError: Unsupported CPU attention configuration: head_dim=16"

    engine = VLLMEngine.__new__(VLLMEngine)  # only the server matters to the error's wording
    engine.server = server
    with pytest.raises(TrainingError) as raised:
        with engine.explained_errors():
            raise TrainingError("vLLM server http://x/v1/completions: HTTP 500: EngineCore encountered an issue",
                                key="rollout")
    assert "the server's log says: RuntimeError: Unsupported CPU attention configuration: head_dim=16" in str(
        raised.value)
    assert str(log) in str(raised.value)

    log.write_text("INFO all fine\n")
    with pytest.raises(TrainingError, match="HTTP 500$|HTTP 500 "):  # nothing to add: the error as it was
        with engine.explained_errors():
            raise TrainingError("HTTP 500", key="rollout")


def test_auto_sync_merges_except_a_lora_policy_on_a_gpu():
    auto, adapter = schema.RolloutSection(engine="vllm"), schema.RolloutSection(engine="vllm", sync="adapter")
    assert engines.sync_mode(auto, lora=True) == "merged"  # on CPU merged is the faster (docs/online-rl.md)
    assert engines.sync_mode(auto, lora=True, on_gpu=True) == "adapter"
    assert engines.sync_mode(auto, lora=True, sharded=True, on_gpu=True) == "merged"
    assert engines.sync_mode(auto, lora=False, on_gpu=True) == "merged"
    assert engines.sync_mode(adapter, lora=True) == "adapter"  # a setting is kept as it is
