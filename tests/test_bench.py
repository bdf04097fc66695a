"""The benchmark code paths that only a GPU runs for real, run on CPU with a tiny model (slow: about a minute):

    pytest -m slow tests/test_bench.py

Benchmarks never assert timings; these tests check that every side produces a throughput and that the MFU table
rows are built from them.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    spec = importlib.util.spec_from_file_location("bench_real_speed", ROOT / "bench" / "real_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
