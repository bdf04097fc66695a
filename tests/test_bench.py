"""The bench library (bench/common.py) and the parts of the benches a CPU checks in seconds: the flags every bench
shares, the fresh-process trial protocol, the results writer, that every results file re-renders to the Markdown and
README block committed beside it, and the code paths that only a GPU runs for real (slow: about a minute):

    pytest tests/test_bench.py
    pytest -m slow tests/test_bench.py

Benchmarks never assert timings; these tests check that every side produces a throughput and that the MFU table
rows are built from them.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = ("run", "ppo", "quickstart", "real_hh", "real_speed", "reward_probe", "rlvr", "rollout")


def _common():
    """bench/common.py, imported as the bench scripts import it (bench/ on sys.path, module `common`)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import common

    return common


def _load(script: str):
    """bench/SCRIPT.py as a module (nothing runs at import)."""
    _common()
    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _bench():
    return _load("run")


# ------------------------------------------------------------------------------------------------ the library


def test_every_bench_parses_the_shared_flags():
    for script in SCRIPTS:
        module = _load(script)
        assert module.arguments().parse_args(["--tables-only"]).tables_only, script
        workers = getattr(module, "WORKERS", {})
        for kind in workers:
            args = module.arguments().parse_args(["--worker", kind, "--spec", "spec.json"])
            assert (args.worker, args.spec) == (kind, Path("spec.json")), script
        parts = getattr(module, "PARTS", None) or getattr(module, "BENCHMARKS", ())
        if parts:
            args = module.arguments().parse_args(["--only", parts[-1], "--only", parts[0]])
            assert _common().selected(args, parts) == [parts[-1], parts[0]], script
            assert _common().selected(module.arguments().parse_args([]), parts) == list(parts), script
            with pytest.raises(SystemExit):
                module.arguments().parse_args(["--only", "no-such-part"])


def test_the_same_flag_means_the_same_thing_in_every_bench(tmp_path):
    run, ppo, quickstart, real_hh = (_load(name) for name in ("run", "ppo", "quickstart", "real_hh"))
    assert run.arguments().parse_args(["--quick"]).quick and ppo.arguments().parse_args(["--quick"]).quick
    assert not run.arguments().parse_args([]).quick
    for module in (quickstart, real_hh):
        assert module.arguments().parse_args(["--out", str(tmp_path)]).out == tmp_path
        assert module.arguments().parse_args([]).out.is_relative_to(ROOT)
    assert quickstart.arguments().parse_args(["--seeds", "4", "5"]).seeds == [4, 5]
    assert quickstart.readme_block(quickstart.arguments().parse_args([]).results) is quickstart.BLOCK
    assert quickstart.readme_block(quickstart.arguments().parse_args(["--results", "quickstart-avx2"]).results) is None
    assert real_hh.arguments().parse_args(["stages.ppo.total_episodes=8"]).overrides == ["stages.ppo.total_episodes=8"]


ECHO_BENCH = """
import os, sys
sys.path.insert(0, {bench!r})
import common


def echo(spec):
    if spec.get("fail"):
        raise ValueError("told to fail")
    return {{"spec": spec, "offline": os.environ.get("HF_HUB_OFFLINE")}}


WORKERS = {{"echo": echo}}

if __name__ == "__main__":
    print("a line that is not the result")
    sys.exit(common.serve_worker(WORKERS, common.bench_parser("echo bench", WORKERS).parse_args()))
"""


def test_a_worker_answers_with_one_result_line_in_a_fresh_process(tmp_path, monkeypatch):
    common = _common()
    script = tmp_path / "echo_bench.py"
    script.write_text(ECHO_BENCH.format(bench=str(BENCH)))
    specs = tmp_path / "specs"
    specs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(specs))
    assert common.run_worker(script, "echo", {"rows": [1, 2]}) == {"spec": {"rows": [1, 2]}, "offline": "1"}
    failed = common.run_worker(script, "echo", {"fail": True})
    assert "ValueError: told to fail" in failed["error"]
    assert common.error_line(failed) == "ValueError: told to fail"
    assert list(specs.iterdir()) == []  # the spec files are removed


def test_the_results_writer_writes_json_markdown_and_the_block(tmp_path):
    common = _common()
    page = tmp_path / "README.md"
    page.write_text("# Title\n\n<!-- t -->\nold\n<!-- /t -->\n\nafter\n")
    block = common.Block(page, "<!-- t -->", "<!-- /t -->")
    common.write_results("demo", {"tokens_per_s": 12.5}, "# demo\n", block, "| a |\n", folder=tmp_path / "results")
    assert (tmp_path / "results" / "demo.json").read_text().endswith("}\n")
    assert common.load_results("demo", tmp_path / "results") == {"tokens_per_s": 12.5}
    assert (tmp_path / "results" / "demo.md").read_text() == "# demo\n"
    assert page.read_text() == "# Title\n\n<!-- t -->\n| a |\n<!-- /t -->\n\nafter\n"
    assert block.read() == "| a |\n"
    common.write_tables("demo", "# again\n", block, "| b |\n", folder=tmp_path / "results")
    assert block.read() == "| b |\n" and common.load_results("demo", tmp_path / "results") == {"tokens_per_s": 12.5}
    assert common.load_results("missing", tmp_path / "results") == {}
    unmarked = common.Block(page, "<!-- none -->", "<!-- /none -->")
    before = page.read_text()
    assert not unmarked.write("x\n") and unmarked.read() is None and page.read_text() == before


def test_every_results_file_renders_to_the_markdown_and_block_beside_it():
    """What `--tables-only` writes is what is committed: the Markdown and README blocks come from the json."""
    common = _common()
    for script in SCRIPTS:
        module = _load(script)
        results = common.load_results(module.NAME)
        assert results, f"bench/results/{module.NAME}.json"
        assert module.markdown(results) == (common.RESULTS / f"{module.NAME}.md").read_text(), script
        block = getattr(module, "BLOCK", None)
        if block is not None:
            assert block.read() == module.block_body(results), f"{script}: {block.path.name} {block.start}"
    rlvr = _load("rlvr")  # its --tools results: their own Markdown and README block
    tools = common.load_results(rlvr.TOOLS_NAME)
    assert rlvr.tools_markdown(tools) == (common.RESULTS / f"{rlvr.TOOLS_NAME}.md").read_text()
    assert rlvr.TOOLS_BLOCK.read() == rlvr.tools_block_body(tools)
    quickstart = _load("quickstart")  # the table of a CPU without AVX-512, kept beside the README's
    avx2 = common.load_results("quickstart-avx2")
    assert quickstart.markdown(avx2) == (common.RESULTS / "quickstart-avx2.md").read_text()


def test_the_tool_bench_compares_with_the_tool_against_the_better_model_without_it(monkeypatch):
    rlvr = _load("rlvr")
    monkeypatch.setattr(rlvr.common, "smollm2_folder", lambda: "smollm2")
    greedy, sampled = rlvr.ACCURACY["grpo"]
    accuracy = lambda before, after: {f"{greedy}_before": before, f"{greedy}_after": after,  # noqa: E731
                                      f"{sampled}_before": before / 2, f"{sampled}_after": after / 2}
    rows = {"warmup": {"wall_s": 250.0}, "grpo": {"wall_s": 900.0, "accuracy": accuracy(0.40, 0.46)},
            "no_tool": {"wall_s": 60.0, "accuracy": accuracy(0.30, 0.31)}}
    # results from before base_no_tool existed: the warm model alone is the model without the tool
    assert rlvr.tool_gain(rows, "before") == pytest.approx(0.10) and rlvr.tool_gain(rows, "after") == pytest.approx(0.16)
    results = {"settings": {"grpo_steps": 20, "eval_prompts": 64}, "cpu": "cpu", "versions": "v", "seeds": {"0": rows}}
    row = rlvr.tools_block_body(results).splitlines()[-1]
    assert row == "| 0 | 0.300 / 0.150 | - | 0.400 -> 0.460 | 0.200 -> 0.230 | met (+16.0) | 250, 900 |", row
    rows["grpo"]["accuracy"] = accuracy(0.40, 0.44)
    assert "| not met (+14.0) |" in rlvr.tools_block_body(results)
    # SmolLM2 as shipped answers better without the tool than the warm model: the gain is measured against it
    rows["base_no_tool"] = {"wall_s": 80.0, "accuracy": accuracy(0.36, 0.36)}
    row = rlvr.tools_block_body(results).splitlines()[-1]
    assert row == "| 0 | 0.300 / 0.150 | 0.360 / 0.180 | 0.400 -> 0.440 | 0.200 -> 0.220 | not met (+8.0) | 250, 900 |"
    rows["no_tool"]["accuracy"] = accuracy(0.50, 0.50)  # whichever of the two is better
    assert rlvr.tool_gain(rows, "after") == pytest.approx(-0.06)
    tail = rlvr.overrides(rlvr.arguments().parse_args(["--tools"]), 0, Path("o"))[-3:]
    assert tail == ["stages.base_no_tool.model.path=smollm2", "stages.no_tool.eval_prompts=100",
                    "stages.base_no_tool.eval_prompts=100"], tail


def test_reward_curves_are_within_noise_when_the_engines_differ_by_less_than_two_standard_errors():
    rollout = _load("rollout")
    hf = [[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0]]  # curve means 0.5 and 1.5; rises 1 and 1
    near = [[1.0, 1.0, 2.0, 2.0], [2.0, 2.0, 3.0, 3.0]]  # means 1.5 and 2.5; rises 1 and 1
    verdict = rollout.curve_verdict(hf, near)
    # means 1.0 and 2.0, each variance 0.5 over 2 seeds: 2 SE = 2 * sqrt(0.5 / 2 + 0.5 / 2) = 1.4142
    assert verdict["mean"]["diff"] == pytest.approx(1.0) and verdict["mean"]["two_se"] == pytest.approx(2 ** 0.5)
    assert verdict["rise"] == {"hf": 1.0, "vllm": 1.0, "diff": 0.0, "two_se": 0.0, "within": True}
    assert verdict["within_noise"]
    far = [[5.0, 5.0, 6.0, 6.0], [5.0, 5.0, 6.0, 6.0]]  # means 5.5 (no spread): 4.5 off, 2 SE = 2 * sqrt(0.25) = 1
    verdict = rollout.curve_verdict(hf, far)
    assert verdict["mean"]["two_se"] == pytest.approx(1.0) and not verdict["mean"]["within"]
    assert not verdict["within_noise"]
    flat = [[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]]  # the same means as hf, but it does not rise
    verdict = rollout.curve_verdict(hf, flat)
    assert verdict["mean"]["within"] and not verdict["rise"]["within"] and not verdict["within_noise"]


def test_reward_curves_compare_only_sides_run_on_the_same_seeds():
    rollout = _load("rollout")
    side = lambda seeds, rewards: {"seeds": len(seeds), "seed_list": seeds, "rewards_per_seed": rewards}  # noqa: E731
    sides = {"ppo/full/hf/-": side([0, 1], [[0.0, 1.0], [1.0, 2.0]]),
             "ppo/full/vllm/merged": side([0, 1], [[0.5, 1.5], [1.0, 2.0]]),
             "ppo/lora/hf/-": side([0], [[0.0, 1.0]]), "ppo/lora/vllm/adapter": side([0], [[0.0, 1.0]]),
             "grpo/full/hf/-": side([0, 1], [[0.0, 0.0], [0.0, 0.0]]),
             "grpo/full/vllm/merged": side([1, 2], [[0.0, 0.0], [0.0, 0.0]])}
    lines = rollout.curves_markdown(sides).splitlines()
    assert "| ppo/full | vllm / merged | 1 | 1.0000 | 2.0000 |" in lines
    summary = [line for line in lines if line.startswith("| ppo/") and "| 2 |" in line]
    # curve means: hf 0.5 and 1.5 (variance 0.5), vllm 1.0 and 1.5 (variance 0.125): 2 SE = 2 * sqrt(0.3125)
    assert summary == ["| ppo/full | merged | 2 | 1.0000 / 1.2500 | +0.2500 (1.1180) | 0.0000 / 0.0000 | "
                       "+0.0000 (0.0000) | yes |"], summary
    assert not any(line.startswith(("| ppo/lora", "| grpo/")) for line in lines)  # one seed; other seeds
    assert rollout.curves_markdown({"ppo/lora/hf/-": sides["ppo/lora/hf/-"]}) == ""


def test_a_contended_side_is_marked_and_gets_no_speed_up():
    rollout = _load("rollout")
    side = lambda step_s: {"generation_s": step_s / 4, "sync_s": 0.0, "step_s": step_s,  # noqa: E731
                           "episodes_per_s": 16 / step_s, "peak_rss_mib": 1.0, "server_peak_rss_mib": 0.0,
                           "steps": 8, "seeds": 3}
    sides = {"ppo/full/hf/-": side(80.0), "ppo/full/vllm/merged": side(40.0)}
    assert "| 10.0 | 0.0 | 40.0 | 0.4 | 2.00x | 2.00x |" in rollout.stage_markdown(sides)
    marked = rollout.stage_markdown(sides, {"ppo/full/hf/-"})
    assert "| ppo | full | hf | - | 20.0* | 0.0* | 80.0* | 0.2* | - | - |" in marked
    assert "| 10.0 | 0.0 | 40.0 | 0.4 | - | - |" in marked and "not comparable" in marked


def test_the_package_imports_no_bench_code():
    for path in (ROOT / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] in ("bench", "common") or "benchkit" in n for n in names), path


# ------------------------------------------------------------------------------------------------ run.py (mfu)


@pytest.mark.slow
def test_mfu_benchmark_runs_its_stages_and_loop(tmp_path):
    bench = _bench()
    result = bench.bench_mfu(tmp_path, smoke=True)
    for side in ("pretrain", "sft", "loop"):
        assert "error" not in result["runs"][side], result["runs"][side]
        assert result[f"{side}_tflops"] > 0
    assert result["flops_per_token"] > 0
    rows = bench.mfu_rows(result)
    assert [r[0] for r in rows][:2] == ["gpu mfu: pretrain stage TFLOP/s vs 989 dense bf16",
                                        "gpu: pretrain stage TFLOP/s vs plain PyTorch loop, same model"]


def test_mfu_without_a_gpu_is_a_skipped_row(tmp_path):
    bench = _bench()
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    result = bench.bench_mfu(tmp_path)
    assert result == {"skipped": "no CUDA device in this job"}
    assert bench.mfu_rows(result)[0][1] == "skipped"


def test_flops_per_token_counts_matmul_parameters_and_attention():
    bench = _bench()
    config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    # per layer: q,o 64x64 each; k,v 64x32 each; mlp 3 x 64x128; norms 2x64; plus final norm 64 and lm_head 100x64
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    matmul_params = 2 * layer + 64 + 100 * 64
    assert bench.flops_per_token(config, vocab=100, seq=128) == 6 * matmul_params + 12 * 2 * 64 * 128


def _real_speed():
    return _load("real_speed")


def test_the_padding_free_profile_variant_computes_the_padded_loss():
    """bench/real_speed.py times padding-free rows against padded batches: the same loss, or the timing compares
    different work."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         attn_implementation="sdpa")).eval()
    ids = torch.randint(1, 50, (3, 9))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [1] * 6 + [0] * 3])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt
    padded = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}
    flat = _real_speed().padding_free(padded)
    assert flat["input_ids"].shape == (1, 19) and flat["position_ids"][0].tolist()[9:13] == [0, 1, 2, 3]
    with torch.no_grad():
        assert torch.allclose(model(**flat).loss, model(**padded).loss, atol=1e-5)
