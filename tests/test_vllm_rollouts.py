"""Rollouts on a vLLM server (`rollout: {engine: vllm}`), against the real vLLM CPU build in `.venv-vllm`
(`bash requirements/vllm.sh` creates it; CI does, and sets PIPELINE_REQUIRE_VLLM=1 so that a missing environment
fails instead of skipping):

- the server follows the policy: after each sync the next rollout's log-probs are the new weights' (full weights
  reloaded in place, a LoRA adapter loaded under a new name, a LoRA policy merged);
- a trainer killed with SIGKILL leaves no server behind;
- a ppo stage on vllm trains, is killed after its first step, resumes to the uninterrupted run's numbers;
- a grpo stage (TRL's GRPOTrainer through its rollout_func) trains a LoRA policy on vllm rollouts;
- two DDP processes share one server.

Each test starts a server (20-60 s on 2 cores). Run: .venv/bin/python -m pytest tests/test_vllm_rollouts.py -q
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tiny_models import save_tiny_chat_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
VLLM_PYTHON = Path(os.environ.get("PIPELINE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


@pytest.fixture(scope="module")
def vllm_python() -> str:
    if not VLLM_PYTHON.exists():
        if os.environ.get("PIPELINE_REQUIRE_VLLM"):
            pytest.fail(f"PIPELINE_REQUIRE_VLLM is set and there is no vLLM interpreter at {VLLM_PYTHON}")
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (bash requirements/vllm.sh creates it)")
    return str(VLLM_PYTHON)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny ChatML policy and reward model (head size 32, which vLLM's CPU attention takes)."""
    root = tmp_path_factory.mktemp("tiny-vllm")
    texts = [json.loads(line)["text"] for line in (DATA / "corpus.jsonl").read_text().splitlines()[:400]]
    save_tiny_chat_model(root / "sft", texts, hidden=64, intermediate=128)
    save_tiny_chat_model(root / "reward", texts, hidden=64, intermediate=128, reward=True, seed=1)
    return root


def hf_logprobs(model, prompt: list[int], ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)]


def sample_gap(engine, model, tokenizer, prompts: list[list[int]]) -> float:
    """The largest |vLLM log-prob - transformers log-prob| over the sampled tokens of `prompts`."""
    sampled = engine.sample(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0,
                            do_sample=True, seeds=[11, 12])
    gaps = []
    for row, prompt in enumerate(prompts):
        ids = [t for t in sampled.response[row].tolist()]
        cut = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
        ids = ids[:cut]
        gaps.append((hf_logprobs(model, prompt, ids) - sampled.sampler_logprobs[row, :cut]).abs().max().item())
    return max(gaps)


def perturb(model, scale: float, names: str = "") -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if names in name:
                param.add_(torch.randn_like(param) * scale)


def test_the_server_samples_from_the_policys_newest_weights(tmp_path, tiny, vllm_python):
    """One server, three policies: a full one (merged sync), a LoRA one (adapter sync) and the same LoRA policy
    merged. After each change and sync, the sampled tokens' log-probs match the changed weights (not the old)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.rl.engines import VLLMEngine, serving_folder
    from pipeline.rl.vllm_client import VLLMClient
    from pipeline.rl.vllm_server import ServerSpec, VLLMServer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "sft")
    full = AutoModelForCausalLM.from_pretrained(tiny / "sft")
    folder = serving_folder(full, tokenizer, tmp_path / "start", torch.float32)
    spec = ServerSpec(model=folder, python=vllm_python, log_path=tmp_path / "server.log", key="test",
                      max_model_len=256, lora_rank=8)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for q in ("2+2?", "7*3?")]
    with VLLMServer(spec) as server:
        client = VLLMClient(server.url)
        merged = VLLMEngine(client, "merged", torch.float32, scratch=tmp_path / "merged")
        merged.sync(full, 0)
        assert sample_gap(merged, full, tokenizer, prompts) < 1e-3
        before = AutoModelForCausalLM.from_pretrained(tiny / "sft")
        perturb(full, 0.5)
        merged.sync(full, 1)
        assert sample_gap(merged, full, tokenizer, prompts) < 1e-3
        assert sample_gap(merged, before, tokenizer, prompts) > 0.05  # the old weights would not explain them

        lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny / "sft"),
                              LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        adapter = VLLMEngine(client, "adapter", torch.float32, scratch=tmp_path / "adapter")
        merged.sync(lora, 2)  # the server's base back to the LoRA policy's
        for version in (3, 4):
            perturb(lora, 0.3, names="lora_B")
            adapter.sync(lora, version)
            assert adapter.model_name == f"policy-v{version}"
            assert sample_gap(adapter, lora, tokenizer, prompts) < 1e-3
        perturb(lora, 0.3, names="lora_B")
        merged.sync(lora, 5)
        assert sample_gap(merged, lora, tokenizer, prompts) < 1e-3


def test_a_killed_trainer_leaves_no_server(tmp_path, tiny, vllm_python):
    script = tmp_path / "holder.py"
    script.write_text(f"""
import sys, time
from pathlib import Path
from pipeline.rl.vllm_server import ServerSpec, VLLMServer
server = VLLMServer(ServerSpec(model={str(tiny / 'sft')!r}, python={vllm_python!r},
                               log_path=Path({str(tmp_path / 'server.log')!r}), key="test", max_model_len=256))
server.start()
print(server.process.pid, flush=True)
time.sleep(600)
""")
    holder = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    server_pid = int(holder.stdout.readline())
    group = os.getpgid(server_pid)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and group_alive(group):
        time.sleep(0.5)
    assert not group_alive(group), "the vLLM server outlived its killed trainer"


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    listing = subprocess.run(["ps", "-o", "stat=", "-g", str(group)], capture_output=True, text=True).stdout.split()
    return any(not state.startswith("Z") for state in listing)


def ppo_recipe(root: Path, tiny: Path, vllm_python: str, name: str, **extra) -> Path:
    stage = {"kind": "ppo", "model": str(tiny / "sft"), "reward_model": str(tiny / "reward"),
             "data": {"path": str(DATA / "prompts.jsonl"), "eval_path": str(DATA / "prompts_eval.jsonl"),
                      "max_rows": 32},
             "train": {"learning_rate": 1e-3, "save_steps": 1, "max_length": 128}, "total_episodes": 12,
             "rollout_batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6,
             "eval_prompts": 4, "rewards": [{"type": "exact_match"}],
             "rollout": {"engine": "vllm", "python": vllm_python, "importance_correction": True}, **extra}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "output_dir": str(root / name), "seed": 0,
                                    "stages": {"ppo": stage}}))
    return path


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=900)


def manifest(root: Path, name: str) -> dict:
    return json.loads((root / name / "ppo" / "manifest.json").read_text())


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if not k.startswith("time/")} for entry in history]


def test_ppo_on_vllm_trains_and_resumes_after_a_kill(tmp_path, tiny, vllm_python):
    """The killed-and-resumed run records what the uninterrupted one does; the log says how far vLLM's log-probs
    are from the trainer's; the artifact loads as a causal LM."""
    from transformers import AutoModelForCausalLM

    whole = cli("run", str(ppo_recipe(tmp_path, tiny, vllm_python, "whole")))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = cli("run", str(ppo_recipe(tmp_path, tiny, vllm_python, "killed")), PIPELINE_TEST_KILL_AT="ppo:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = cli("run", str(tmp_path / "killed.yaml"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    want, got = manifest(tmp_path, "whole"), manifest(tmp_path, "killed")
    assert [h["step"] for h in got["log_history"]] == [1, 2, 3]
    assert without_timing(got["log_history"]) == without_timing(want["log_history"])
    assert got["metrics"] == want["metrics"]
    assert all(0 <= h["rollout/logprob_diff_mean"] <= h["rollout/logprob_diff_max"] < 0.05
               for h in got["log_history"])
    assert all("time/weight_sync" in h for h in got["timing"]["log_history"])
    AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / "ppo")
    assert not list((tmp_path / "killed").glob(".work/*/vllm")), "the stage's weight-sync folder was left behind"


def test_grpo_lora_on_vllm_trains_through_trls_rollout_func(tmp_path, tiny, vllm_python):
    from safetensors.torch import load_file

    stage = {"kind": "grpo", "model": str(tiny / "sft"), "lora": {"r": 8},
             "data": {"path": str(DATA / "prompts.jsonl"), "eval_path": str(DATA / "prompts_eval.jsonl"),
                      "max_rows": 16},
             "train": {"learning_rate": 1e-2, "batch_size": 4, "max_steps": 2, "logging_steps": 1,
                       "max_length": 128},
             "num_generations": 4, "max_new_tokens": 6, "eval_prompts": 2, "eval_samples": 2,
             "rewards": [{"type": "exact_match"}, {"type": "length_penalty", "target_length": 4}],  # lengths vary
             "rollout": {"engine": "vllm", "python": vllm_python, "sync": "adapter"}}  # auto merges on CPU
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump({"name": "grpo", "output_dir": str(tmp_path / "out"), "seed": 0,
                                      "stages": {"grpo": stage}}))
    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "grpo" / "manifest.json").read_text())["log_history"]
    assert any(entry.get("reward_std", 0) > 0 for entry in history), history  # groups had a signal to learn from
    adapter = load_file(str(tmp_path / "out" / "grpo" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained away from B = 0


def test_two_ddp_processes_share_one_server(tmp_path, tiny, vllm_python):
    torchrun = Path(sys.executable).with_name("torchrun")
    recipe = ppo_recipe(tmp_path, tiny, vllm_python, "ddp", total_episodes=8)
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "pipeline", "run",
                             str(recipe)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                 "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log = tmp_path / "ddp" / "ppo" / "vllm-server.log"  # kept in the artifact, beside train.log
    assert log.read_text().count("Started server process") == 1  # one server, started by rank 0
    history = manifest(tmp_path, "ddp")["log_history"]
    assert [h["step"] for h in history] == [1, 2]


def test_fsdp_ranks_gather_the_policy_for_one_server(tmp_path, tiny, vllm_python):
    """Under FSDP2 (two CPU processes) every rank gathers its shards of a LoRA policy and rank 0 pushes the merged
    whole: the server samples from the trained weights (the log-prob gap stays small at a learning rate that moves
    them) and the stage trains to the end; `sync: adapter` is refused there."""
    hook = ROOT / "tests" / "fsdp_on_cpu"
    recipe = ppo_recipe(tmp_path, tiny, vllm_python, "fsdp", total_episodes=8,
                        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                        train={"learning_rate": 1e-2, "save_steps": 100, "max_length": 128})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PIPELINE_TEST_FSDP_ON_CPU": "1", "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)])}
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
               str(hook / "accelerate_fsdp2.yaml"), "-m", "pipeline", "run", str(recipe)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    history = manifest(tmp_path, "fsdp")["log_history"]
    assert [h["step"] for h in history] == [1, 2]
    assert all(h["rollout/logprob_diff_max"] < 0.05 for h in history), history
    assert (tmp_path / "fsdp" / "ppo" / "vllm-server.log").read_text().count("Started server process") == 1

    adapter = yaml.safe_load(recipe.read_text())
    adapter["stages"]["ppo"]["rollout"]["sync"] = "adapter"
    adapter["output_dir"] = str(tmp_path / "adapter")
    recipe.write_text(yaml.safe_dump(adapter))
    refused = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert refused.returncode != 0  # each rank exits 2; the launcher reports the failed ranks as 1
    assert "stages.ppo.rollout.sync: sync: adapter does not run under FSDP" in refused.stdout + refused.stderr
