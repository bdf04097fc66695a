"""`train.group_by_length`: the order it gives (a permutation whose batches hold rows of similar length, seeded),
that the sft, reward and dpo trainers read their rows in that order (their batches carry little padding), and that
the stages it does not apply to refuse it.

Run: `pytest tests/test_length_grouping.py` (tiny models built from config, a few seconds). The kill-and-resume
check of a length-grouped stage is in tests/test_resume.py.
"""
from __future__ import annotations

import random

import pytest

from pipeline import data as data_lib
from pipeline import training
from pipeline.stages.common import length_grouped
from test_reward_model import chat_tokenizer, tiny_classifier


def test_hand_computed_order_with_one_batch_per_group():
    # group_batches=1: each group is one batch, sorted by length; the full batches are shuffled, the short one last
    lengths = [5, 1, 4, 2, 3]
    rows = list(range(5))
    rng = random.Random(7)
    rng.shuffle(rows)
    batches = [sorted(rows[0:2], key=lengths.__getitem__), sorted(rows[2:4], key=lengths.__getitem__)]
    short = [rows[4]]
    rng.shuffle(batches)
    want = batches[0] + batches[1] + short
    assert data_lib.length_grouped_order(lengths, batch_size=2, seed=7, group_batches=1) == want


def _padding_share(lengths: list[int], order: list[int], batch_size: int) -> float:
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    real = sum(lengths)
    return real / sum(len(b) * max(lengths[r] for r in b) for b in batches)


def test_batches_hold_similar_lengths_and_the_order_is_seeded():
    rng = random.Random(0)
    lengths = [rng.randint(1, 200) for _ in range(1000)]
    order = data_lib.length_grouped_order(lengths, batch_size=8, seed=0)
    assert sorted(order) == list(range(1000))
    assert order == data_lib.length_grouped_order(lengths, batch_size=8, seed=0)
    assert order != data_lib.length_grouped_order(lengths, batch_size=8, seed=1)
    shuffled = list(range(1000))
    random.Random(0).shuffle(shuffled)
    assert _padding_share(lengths, order, 8) > 0.95 > 0.7 > _padding_share(lengths, shuffled, 8)
    # the batches are not run shortest to longest: the first and second half of the run hold similar lengths
    first, second = (sum(lengths[r] for r in half) / len(half) for half in (order[:500], order[500:]))
    assert abs(first - second) < 0.2 * (first + second) / 2


def _ctx(tmp_path, **train):
    from contexts import stage_ctx

    return stage_ctx(tmp_path, {"kind": "sft", "model": "m", "train": train})


def _rows(count: int = 48) -> list[dict]:
    """Conversations as in HH-RLHF: the context's length varies most, the answers are short."""
    rng = random.Random(0)
    words = ["good", "bad", "one", "hi", "there", "go"]

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    def answer():
        return [{"role": "assistant", "content": text(1, 4)}]

    return [{"prompt": [{"role": "user", "content": text(1, 60)}], "completion": answer(), "chosen": answer(),
             "rejected": answer()} for _ in range(count)]


def _tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))


def _trainer(kind: str, ctx, tokenizer):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    from pipeline.stages import reward

    rows = Dataset.from_list(_rows())
    common = training.trainer_kwargs(ctx, ctx.config.train)
    if kind == "sft":
        rows = length_grouped(ctx, rows.remove_columns(["chosen", "rejected"]), data_lib.row_tokens(tokenizer))
        args = SFTConfig(**common, max_length=256, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
        return SFTTrainer(model=_tiny_causal_lm(), args=args, train_dataset=rows, processing_class=tokenizer)
    if kind == "reward":
        pairs = reward.tokenized_pairs(rows.remove_columns(["completion"]), tokenizer, 256)
        args = RewardConfig(**common, max_length=256, pad_token=tokenizer.pad_token)
        return RewardTrainer(model=tiny_classifier(), args=args, processing_class=tokenizer,
                             train_dataset=length_grouped(ctx, pairs, reward.pair_tokens))
    rows = length_grouped(ctx, rows.remove_columns(["completion"]), data_lib.row_tokens(tokenizer))
    args = DPOConfig(**common, max_length=256, padding_free=False, pad_token=tokenizer.pad_token)
    return DPOTrainer(model=_tiny_causal_lm(), ref_model=_tiny_causal_lm(), args=args, train_dataset=rows,
                      processing_class=tokenizer)


def _loader_padding_share(trainer) -> float:
    real = total = 0
    for batch in trainer.get_train_dataloader():
        masks = [value for key, value in batch.items() if key.endswith("attention_mask")]
        real += sum(int(mask.sum()) for mask in masks)
        total += sum(mask.numel() for mask in masks)
    return real / total


@pytest.mark.parametrize("kind", ["sft", "reward", "dpo"])
def test_the_trainers_read_the_rows_in_length_grouped_batches(tmp_path, kind):
    tokenizer = chat_tokenizer()
    grouped = _loader_padding_share(_trainer(kind, _ctx(tmp_path, batch_size=4, group_by_length=True), tokenizer))
    shuffled = _loader_padding_share(_trainer(kind, _ctx(tmp_path, batch_size=4), tokenizer))
    assert grouped > 0.85 and shuffled < 0.75, (grouped, shuffled)


@pytest.mark.parametrize("kind", ["pretrain", "ppo", "kto", "grpo"])
def test_stages_whose_batches_do_not_pad_refuse_it(kind, tmp_path):
    from pipeline.errors import RecipeError
    from pipeline.recipe import parse_recipe

    stage = {"kind": kind, "model": "m", "data": {"path": "d.jsonl"}, "train": {"group_by_length": True},
             **({"reward_model": "r"} if kind in ("ppo", "grpo") else {})}
    with pytest.raises(RecipeError, match="group_by_length` applies to sft, reward, dpo, ipo, cpo, simpo, orpo stages"):
        parse_recipe({"name": "r", "stages": {"s": stage}}, tmp_path / "recipe.yaml")


def test_in_defaults_it_is_refused_for_the_stages_it_does_not_apply_to(tmp_path):
    """defaults.train reaches every stage: a ppo stage then names the key and where to put it instead."""
    import yaml

    from pipeline.errors import RecipeError
    from pipeline.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "r", "output_dir": str(tmp_path / "out"), "defaults": {"train": {"group_by_length": True}},
        "stages": {"sft": {"kind": "sft", "model": "m", "data": {"path": "d.jsonl"}},
                   "ppo": {"kind": "ppo", "model": "${sft}", "reward_model": "r", "data": {"path": "p.jsonl"}}}}))
    with pytest.raises(RecipeError, match=r"stages\.ppo.*group_by_length` applies to sft, reward, dpo, ipo, cpo, simpo, orpo stages.*"
                                          r"not in defaults"):
        load_recipe(path)
