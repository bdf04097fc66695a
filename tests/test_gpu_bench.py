"""bench/gpu.py and bench/gpu.sh, checked on a CPU in seconds: the flags, the two models' sizes (built on the meta
device), the MFU and RL arithmetic on hand-computed examples, every recipe the bench runs against the project's
loader, the global deadline, the dry run's results, and the shell script (syntax, dry run).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_gpu_bench.py

The measurements themselves need a CUDA GPU (`bash bench/gpu.sh`); `python bench/gpu.py --quick` runs every part for
real at tiny sizes on a CPU (about 2 minutes, longer with the vLLM parts), which these tests do not.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def gpu():
    """bench/gpu.py as a module, imported as the bench scripts are (bench/ on sys.path); nothing runs at import."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch):
    for name in ("GPU_PEAK_TFLOPS", "GPU_BENCH_DEADLINE_S", "GPU_BENCH_VLLM_PYTHON"):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------------------ flags


def test_flags(gpu, tmp_path):
    args = gpu.arguments().parse_args([])
    assert (args.deadline_s, args.dry_run, args.quick, args.keep) == (420.0, False, False, False)
    assert args.out == gpu.DEFAULT_OUT and args.out.is_relative_to(ROOT)
    assert args.vllm_python == str(ROOT / ".venv-vllm" / "bin" / "python")
    assert gpu.sizes_from(args) == gpu.FULL
    args = gpu.arguments().parse_args(["--dry-run", "--out", str(tmp_path), "--only", "ppo_vllm", "--only",
                                       "pretrain", "--deadline-s", "60", "--steps", "5", "--rl-steps", "3"])
    assert args.dry_run and args.out == tmp_path and args.deadline_s == 60.0
    assert gpu.common.selected(args, gpu.PARTS) == ["ppo_vllm", "pretrain"]
    sizes = gpu.sizes_from(args)
    assert (sizes.steps, sizes.warmup, sizes.rl_steps, sizes.seq) == (5, 3, 3, 2048)
    assert gpu.sizes_from(gpu.arguments().parse_args(["--quick"])).mfu_config == gpu.TINY
    assert gpu.common.selected(gpu.arguments().parse_args([]), gpu.PARTS) == list(gpu.PARTS)
    worker = gpu.arguments().parse_args(["--worker", "stage", "--spec", "spec.json"])
    assert (worker.worker, worker.spec) == ("stage", Path("spec.json"))
    assert gpu.arguments().parse_args(["--tables-only"]).tables_only
    with pytest.raises(SystemExit):
        gpu.arguments().parse_args(["--only", "no-such-part"])


def test_part_names(gpu):
    assert gpu.PARTS[:3] == ("pretrain", "sft_full", "sft_lora")
    assert gpu.part_kind("pretrain") == ("pretrain", False, None)
    assert gpu.part_kind("sft_lora") == ("sft", True, None)
    assert gpu.part_kind("ppo_hf") == ("ppo", False, "hf")
    assert gpu.part_kind("grpo_lora_vllm") == ("grpo", True, "vllm")
    assert {gpu.part_kind(p)[2] for p in gpu.RL_PARTS} == {"hf", "vllm"}


# ------------------------------------------------------------------------------------------------------ sizes


def llama_parameters(vocab, hidden, layers, heads, kv_heads, intermediate):
    """By hand: per layer q and o (hidden^2 each), k and v (hidden x kv width), the SwiGLU MLP (3 matrices) and two
    RMSNorms; the input embedding, the final norm and an untied LM head."""
    kv = hidden // heads * kv_heads
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    return layers * layer + hidden + 2 * vocab * hidden


def test_the_models_have_the_sizes_asked_for(gpu):
    big = llama_parameters(32000, 2048, 16, 32, 8, 8192)
    assert big == 1_104_218_112 and gpu.count_parameters(gpu.LLAMA_1B) == big  # ~1.1B
    rl = llama_parameters(32000, 1024, 24, 16, 16, 2816)
    assert rl == 373_867_520 and gpu.count_parameters(gpu.LLAMA_05B) == rl  # the "~0.5B" widths, 32k vocabulary
    # the reward model: the LM head (32000 x 1024) replaced by a one-label score head
    assert gpu.count_parameters(gpu.LLAMA_05B, reward=True) == rl - 32000 * 1024 + 1024
    assert gpu.matmul_parameters(gpu.LLAMA_1B) == big - 32000 * 2048
    for key, value in dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                           intermediate_size=8192, vocab_size=32000).items():
        assert gpu.LLAMA_1B[key] == value, key
    assert gpu.FULL.seq == 2048 and gpu.FULL.precision == "bf16"


# ------------------------------------------------------------------------------------------------------ arithmetic


def test_mfu_on_a_hand_computed_example(gpu):
    matmul = 1_104_218_112 - 32000 * 2048  # 1,038,682,112: all but the input embedding
    attention = 12 * 16 * 2048 * 2048  # 12 x layers x hidden x seq = 805,306,368
    assert gpu.flops_per_token(gpu.LLAMA_1B, 2048) == 6 * matmul + attention == 7_037_399_040
    assert gpu.flops_per_token(gpu.LLAMA_1B, 2048, weight_gradients=False) == 4 * matmul + attention
    # 70,000 tokens/s x 7.0374e9 FLOPs = 492.62 TFLOP/s, of 989: 0.498097
    assert gpu.mfu(70_000, 7_037_399_040, 989.0) == pytest.approx(0.498097, abs=1e-6)
    assert gpu.mfu(70_000, 7_037_399_040, None) is None

    # 3 slow warm-up steps, then 10 steps of 0.1 s with 4 x 2048 tokens each: 81,920 tokens/s
    steps, clock = [], 0.0
    for seconds in [5.0, 1.0, 1.0] + [0.1] * 10:
        steps.append((clock, clock + seconds))
        clock += seconds
    raw = {"steps": steps, "tokens": [[i + 1, 8192.0 * (i + 1)] for i in range(13)], "peak_cuda_mib": 1024.0}
    row = gpu.mfu_summary("pretrain", raw, gpu.FULL, 989.0)
    assert (row["status"], row["steps_timed"], row["tokens_timed"], row["tokens_from"]) == ("ok", 10, 81920.0,
                                                                                         "num_tokens")
    assert row["tokens_per_s"] == pytest.approx(81_920)
    assert row["tflops"] == pytest.approx(81_920 * 7_037_399_040 / 1e12)
    assert row["mfu"] == pytest.approx(0.582916, abs=1e-6) and "mfu_executed" not in row
    lora = gpu.mfu_summary("sft_lora", {**raw, "tokens": []}, gpu.FULL, 989.0)  # no token log: batch x seq
    assert lora["tokens_from"] == "batch x seq" and lora["tokens_timed"] == 10 * 4 * 2048
    assert lora["mfu_executed"] == pytest.approx(81_920 * (4 * matmul + attention) / 989e12)
    assert gpu.mfu_summary("pretrain", {"steps": []}, gpu.FULL, 989.0)["status"] == "error"


def test_peak_by_device_name(gpu, monkeypatch):
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA H200") == 989.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("Tesla T4") is None and gpu.peak_tflops(None) is None
    monkeypatch.setenv("GPU_PEAK_TFLOPS", "500")
    assert gpu.peak_tflops("Tesla T4") == 500.0


def test_rl_split_and_generation_share(gpu):
    # PPO: 3 steps of 2 s after a 6 s first one; the manifest's timing log says 1.5 s of each is generation
    steps = [(0.0, 6.0), (6.0, 8.0), (8.0, 10.0), (10.0, 12.0)]
    timing = [{"step": i + 1, "time/generation": 1.5, "time/scoring": 0.2, "time/update": 0.3} for i in range(4)]
    row = gpu.rl_summary("ppo_hf", {"steps": steps, "timing": timing}, gpu.FULL)
    assert (row["steps_timed"], row["seconds_per_step"]) == (3, 2.0)
    assert row["episodes_per_s"] == pytest.approx(64 * 3 / 6.0)
    assert row["generation_share"] == pytest.approx(0.75) and row["weight_sync_share"] == 0.0
    assert row["split_s_per_step"] == pytest.approx({"generation": 1.5, "scoring": 0.2, "update": 0.3,
                                                     "weight_sync": 0.0})
    # GRPO on vLLM: the timed _generate (1.0 s) holds the weight sync (0.25 s); one event per step, at its start
    events = {"generation": [(s + 0.01, 1.0) for s, _ in steps], "weight_sync": [(s + 0.02, 0.25) for s, _ in steps],
              "server_start": [(-30.0, 20.0)]}
    row = gpu.rl_summary("grpo_vllm", {"steps": steps, "events": events}, gpu.FULL)
    assert row["split_s_per_step"] == pytest.approx({"generation": 0.75, "scoring_and_update": 1.0,
                                                     "weight_sync": 0.25})
    assert row["generation_share"] == pytest.approx(0.375) and row["server_start_s"] == 20.0
    assert gpu.summarise("ppo_hf", {"status": "error", "error": "x"}, gpu.FULL, None)["error"] == "x"


def test_timers_record_steps_and_events(gpu):
    class Loop:
        def step(self):
            return "stepped"

        def generate(self):
            return "generated"

    timers = gpu.Timers()
    timers.wrap(Loop, "step", None)
    timers.wrap(Loop, "generate", "generation")
    assert Loop().step() == "stepped" and Loop().generate() == "generated"
    assert len(timers.steps) == 1 and timers.steps[0][1] >= timers.steps[0][0]
    assert list(timers.events) == ["generation"] and len(timers.events["generation"]) == 1
    callback = timers.step_callback()
    for _ in range(2):
        callback.on_step_begin(None, None, None)
        callback.on_step_end(None, None, None)
    assert len(timers.steps) == 3 and timers.steps[2][0] == timers.steps[1][1]  # back to back


# ------------------------------------------------------------------------------------------------------ recipes


def test_the_recipes_name_what_a_part_measures(gpu, tmp_path):
    built = gpu.recipes(list(gpu.PARTS), gpu.FULL, tmp_path, "/venv/bin/python")
    assert list(built) == list(gpu.PARTS)
    stage = lambda part: next(iter(built[part]["stages"].values()))  # noqa: E731
    assert stage("pretrain")["model"]["config"] == gpu.LLAMA_1B
    assert stage("pretrain")["train"]["max_steps"] == 13 and stage("sft_full")["train"]["max_length"] == 2048
    assert "lora" in stage("sft_lora") and "lora" not in stage("sft_full")
    assert stage("ppo_hf")["rollout"] == {"engine": "hf"}
    assert stage("grpo_lora_vllm")["rollout"] == {"engine": "vllm", "python": "/venv/bin/python"}
    assert stage("ppo_lora_hf")["value_lora"] is True and "value_lora" not in stage("ppo_hf")
    assert stage("grpo_hf")["train"]["batch_size"] % stage("grpo_hf")["num_generations"] == 0
    assert {built[p]["output_dir"] for p in gpu.PARTS} == {str(tmp_path / p / "artifacts") for p in gpu.PARTS}


@pytest.fixture(scope="module")
def inputs(gpu, tmp_path_factory):
    """A work folder with the data files the recipes read and placeholders for the tokenizer and model folders."""
    work = tmp_path_factory.mktemp("gpu-inputs")
    gpu.write_data(gpu.FULL, work)
    gpu.stub_inputs(work)
    return work


@pytest.mark.parametrize("part", [
    "pretrain", "sft_full", "sft_lora", "ppo_hf", "ppo_vllm", "grpo_hf", "grpo_vllm", "ppo_lora_hf",
    "ppo_lora_vllm", "grpo_lora_hf", "grpo_lora_vllm"])
def test_every_recipe_validates_with_the_project_loader(gpu, inputs, part):
    from pipeline.recipe import parse_recipe

    kind, lora, engine = gpu.part_kind(part)
    if engine == "vllm" and not gpu.rollout_supported():
        pytest.skip("this tree's schema has no `rollout` field yet: the vllm recipes cannot validate (the bench "
                    "skips those parts with that reason)")
    for sizes in (gpu.FULL, gpu.QUICK):
        recipe = gpu.for_this_schema(gpu.recipe_for(part, sizes, inputs, "/venv/bin/python"))
        parsed = parse_recipe(recipe, inputs / f"{part}.yaml")
        config = parsed.stages[kind]
        assert config.kind == kind and (getattr(config, "lora", None) is not None) == lora
        if engine is not None and gpu.rollout_supported():
            assert config.rollout.engine == engine
        if kind in ("pretrain", "sft"):
            assert config.train.max_length == sizes.seq and config.train.packing is True
            assert config.train.max_steps == sizes.warmup + sizes.steps
        elif kind == "ppo":
            assert config.total_episodes // config.rollout_batch_size == sizes.rl_steps
        else:
            assert config.train.max_steps == sizes.rl_steps


def test_without_a_rollout_field_the_hf_recipes_drop_the_default_engine(gpu, monkeypatch):
    recipe = gpu.recipe_for("grpo_hf", gpu.FULL, Path("/w"), "/venv/bin/python")
    monkeypatch.setattr(gpu, "rollout_supported", lambda: False)
    assert "rollout" not in gpu.for_this_schema(recipe)["stages"]["grpo"]
    assert "rollout" in recipe["stages"]["grpo"]  # the built recipe is left as it is
    vllm = gpu.recipe_for("grpo_vllm", gpu.FULL, Path("/w"), "/venv/bin/python")
    assert gpu.for_this_schema(vllm) == vllm


# ------------------------------------------------------------------------------------------------------ driver


def test_the_deadline_skips_the_parts_left_and_vllm_parts_say_why(gpu, tmp_path):
    said = []
    backend = gpu.Backend(worker=gpu.fake_worker(gpu.FULL), vllm_problem=lambda python, cuda: "no vLLM here",
                          clock=gpu.fake_clock(10.0))
    results = gpu.run_parts(list(gpu.PARTS), gpu.FULL, tmp_path, deadline_s=100.0, vllm_python="/none",
                            backend=backend, say=said.append)
    rows = results["parts"]
    assert list(rows) == list(gpu.PARTS) and len(said) == len(gpu.PARTS) + 1
    assert rows["pretrain"]["status"] == "ok" and rows["pretrain"]["mfu"] > 0
    assert rows["ppo_vllm"] == {"status": "skipped", "reason": "no vLLM here"}
    skipped = [p for p, row in rows.items() if row.get("reason", "").startswith("deadline")]
    first = gpu.PARTS.index(skipped[0])  # from the first part the deadline skips, every part is skipped
    assert first > 0 and all(rows[p]["status"] == "skipped" for p in gpu.PARTS[first:])
    assert all(rows[p]["status"] == "ok" for p in gpu.PARTS[:first] if gpu.part_kind(p)[2] != "vllm")
    assert "deadline" in gpu.markdown(results)

    def failing(kind, spec, timeout, log):
        if kind == "setup":
            return {"status": "error", "error": "exit 1: no GPU"}
        raise AssertionError("no part runs after a failed setup")

    failed = gpu.run_parts(["pretrain"], gpu.FULL, tmp_path, deadline_s=100.0, vllm_python="/none",
                           backend=gpu.Backend(worker=failing, vllm_problem=lambda p, c: None,
                                               clock=gpu.fake_clock()), say=said.append)
    assert failed["parts"]["pretrain"]["reason"].startswith("setup failed")


def test_a_worker_past_the_deadline_is_killed(gpu, tmp_path, monkeypatch):
    """The real process runner: a worker that sleeps past its timeout is killed and recorded as timed out."""
    script = tmp_path / "sleepy.py"
    script.write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(gpu, "SCRIPT", script)
    row = gpu.process_worker("stage", {}, 1.0, tmp_path / "logs" / "part.log")
    assert row["status"] == "timeout" and "killed" in row["error"]


def test_the_dry_run_writes_results_for_fake_measurements(gpu, tmp_path):
    stored = gpu.common.RESULTS / "gpu.json"
    before = stored.stat().st_mtime if stored.exists() else None
    assert gpu.main(["--dry-run", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["fake"] is True and list(results["parts"]) == list(gpu.PARTS)
    assert all(row["status"] == "ok" for row in results["parts"].values())
    expected = "ok" if gpu.rollout_supported() else "not validated"
    assert all(state.startswith("ok" if gpu.part_kind(p)[2] != "vllm" else expected)
               for p, state in results["recipes_validated"].items()), results["recipes_validated"]
    assert results["parameters"]["mfu_model"] == 1_104_218_112
    assert results["parts"]["pretrain"]["mfu"] == pytest.approx(
        results["parts"]["pretrain"]["tokens_per_s"] * 7_037_399_040 / 989e12)
    markdown = (tmp_path / "gpu.md").read_text()
    assert markdown == gpu.markdown(results)  # --tables-only renders the same page from the json
    assert "Dry run: fake measurements" in markdown and "| pretrain | 10 |" in markdown
    assert "| grpo | LoRA | vllm |" in markdown
    assert sorted(p.stem for p in (tmp_path / "recipes").iterdir()) == sorted(gpu.PARTS)
    assert (stored.stat().st_mtime if stored.exists() else None) == before  # bench/results untouched


# ------------------------------------------------------------------------------------------------------ gpu.sh


def test_gpu_sh_parses():
    done = subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_sh_dry_run_hands_its_arguments_to_the_bench(tmp_path):
    env = {**os.environ, "GPU_BENCH_PYTHON": sys.executable, "GPU_BENCH_OUT": str(tmp_path / "dry")}
    done = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--dry-run", "--only", "sft_lora", "ppo_vllm"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "dry" / "gpu.json").read_text())
    assert list(results["parts"]) == ["sft_lora", "ppo_vllm"] and results["fake"] is True
