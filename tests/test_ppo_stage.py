"""The `ppo` stage end to end on tiny models built in a tmp folder: full and LoRA policies, saved artifacts that
load, parameters that changed, metrics in the manifest, and resuming from a mid-run checkpoint.

Run: .venv/bin/python -m pytest tests/test_ppo_stage.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import recipe as recipe_lib
from pipeline import runner



@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tokenizer, a tiny Llama policy ('sft') and a tiny reward model with the same tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline.stages.tokenizer import build

    root = tmp_path_factory.mktemp("tiny")
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "data/corpus.jsonl").read_text().splitlines()]
    tok = build([r["text"] for r in rows[:500]], 300, 2, "chatml", 128)
    config = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    for name, cls, extra in (("sft", LlamaForCausalLM, {}), ("reward", LlamaForSequenceClassification,
                                                             {"num_labels": 1})):
        model = cls(LlamaConfig(**config, **extra))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def write_recipe(root: Path, tiny: Path, **ppo) -> Path:
    data = Path(__file__).parents[1] / "data"
    stage = {"kind": "ppo", "model": str(tiny / "sft"), "reward_model": str(tiny / "reward"),
             "data": {"path": str(data / "prompts.jsonl"), "eval_path": str(data / "prompts_eval.jsonl"),
                      "max_rows": 32},
             "train": {"learning_rate": 1e-3, "save_steps": 1}, "total_episodes": 8, "rollout_batch_size": 4,
             "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6, "eval_prompts": 4,
             "rewards": [{"type": "exact_match"}], **ppo}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "ppo-test", "output_dir": str(root / "out"), "seed": 0,
                                    "stages": {"ppo": stage}}))
    return path


def run(path: Path):
    return runner.run_recipe(recipe_lib.load_recipe(path))["ppo"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(folder / name))


def test_full_ppo_changes_policy_and_records_metrics(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    artifact = run(write_recipe(tmp_path, tiny))
    metrics = artifact.manifest["metrics"]
    for key in ("eval_reward_before", "eval_reward_after", "eval_accuracy_before", "eval_accuracy_after", "kl"):
        assert key in metrics
    assert metrics["steps"] == 2
    history = artifact.manifest["log_history"]
    assert [h["step"] for h in history] == [1, 2]
    for key in ("reward/mean", "kl", "policy/entropy", "policy/clipfrac", "loss/value", "policy/approx_kl",
                "response_length"):
        assert key in history[0]
    timing = artifact.manifest["timing"]["log_history"]  # wall-clock, kept out of log_history
    assert [t["step"] for t in timing] == [1, 2] and not any(k.startswith("time/") for k in history[0])
    for key in ("time/generation", "time/scoring", "time/update"):
        assert timing[0][key] > 0
    model = AutoModelForCausalLM.from_pretrained(artifact.path)
    before, after = weights(tiny / "sft"), weights(artifact.path)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(tiny / "sft").config.vocab_size


def test_lora_ppo_writes_an_adapter(tmp_path, tiny):
    from peft import AutoPeftModelForCausalLM

    artifact = run(write_recipe(tmp_path, tiny, lora={"r": 4, "alpha": 8, "dropout": 0.0}, value_head=True))
    assert (artifact.path / "adapter_config.json").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(artifact.path)
    lora_b = [v for k, v in weights(artifact.path).items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: it trained
    assert model is not None and "kl" in artifact.manifest["metrics"]


def test_ppo_on_rule_rewards_alone_with_a_value_head(tmp_path, tiny):
    """Verifiable rewards: no reward model, the rules are the whole reward; a length rule gives the sampled
    responses different rewards, so the policy moves."""
    recipe = write_recipe(tmp_path, tiny, value_head=True,
                          rewards=[{"type": "exact_match"}, {"type": "length_penalty", "target_length": 3}])
    spec = yaml.safe_load(recipe.read_text())
    del spec["stages"]["ppo"]["reward_model"]
    recipe.write_text(yaml.safe_dump(spec))
    artifact = run(recipe)
    metrics = artifact.manifest["metrics"]
    assert "eval_reward_before" in metrics and "eval_accuracy_after" in metrics
    assert metrics["eval_reward_before"] <= 0  # rules alone: exact match (0 here) minus the length penalty
    assert any(not torch.equal(v, weights(artifact.path)[k]) for k, v in weights(tiny / "sft").items())


def test_ppo_without_a_reward_model_needs_rules_and_a_critic():
    from pydantic import ValidationError

    from pipeline import schema

    data = {"path": "d.jsonl"}
    with pytest.raises(ValidationError, match="value_head: true"):
        schema.PpoStage(kind="ppo", model="m", data=data, rewards=[{"type": "exact_match"}])
    with pytest.raises(ValidationError, match="at least one rule"):
        schema.PpoStage(kind="ppo", model="m", data=data, value_head=True)
    assert schema.PpoStage(kind="ppo", model="m", data=data, rewards=[{"type": "exact_match"}], value_head=True)


def test_resume_continues_from_checkpoint(tmp_path, tiny):
    from pipeline import schema
    from pipeline.rl import trainer as tr
    from pipeline.stages import ppo
    from pipeline.models import load_causal_lm, load_reward_model, load_tokenizer

    recipe = recipe_lib.load_recipe(write_recipe(tmp_path, tiny, total_episodes=12))
    cfg: schema.PpoStage = recipe.stages["ppo"]
    tokenizer = load_tokenizer(str(tiny / "sft"))
    rows = [{"prompt": [{"role": "user", "content": f"Add {i} and 2."}], "answer": str(i + 2)} for i in range(8)]

    def make(total: int):
        torch.manual_seed(0)
        policy = load_causal_lm(str(tiny / "sft"), cfg.model)
        m = tr.Models(policy=policy, critic=tr.Critic(load_reward_model(str(tiny / "reward"))),
                      reward=load_reward_model(str(tiny / "reward")), tokenizer=tokenizer,
                      reference=tr.reference_copy(policy))
        return tr.PPOTrainer(cfg.model_copy(update={"total_episodes": total}), m, rows, tmp_path / "work")

    first = make(8)  # 2 steps of 4 episodes; a checkpoint after step 1 (save_steps 1, none after the last)
    first.train()
    assert (tmp_path / "work" / tr.CHECKPOINT).exists()
    first.save_checkpoint()  # as if killed right after step 2
    second = make(12)
    assert second.load_checkpoint() and second.state.step == 2
    assert second.kl_ctl.value == first.kl_ctl.value
    for model in ("policy", "critic"):  # weights and optimiser moments come back exactly
        for a, b in zip(getattr(first.m, model).parameters(), getattr(second.m, model).parameters()):
            assert torch.equal(a, b), model
    moments = [(s["exp_avg"], t["exp_avg"]) for s, t in zip(first.policy_opt.state.values(),
                                                            second.policy_opt.state.values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)
    history = second.train()
    assert [h["step"] for h in history] == [1, 2, 3]
    assert ppo.evaluate is not None


def test_scoring_in_micro_batches_equals_one_full_pass(tiny):
    """Log-probs and entropy from response-position logits (chunked, in micro-batches trimmed of their padding)
    equal a full-vocabulary log-softmax over one whole-batch forward; so do the critic's values."""
    from pipeline.models import load_causal_lm, load_reward_model, load_tokenizer
    from pipeline.rl import losses
    from pipeline.rl import rollout as ro
    from pipeline.rl import trainer as tr
    from pipeline.schema import ModelSection

    tokenizer = load_tokenizer(str(tiny / "sft"))
    policy = load_causal_lm(str(tiny / "sft"), ModelSection(path=str(tiny / "sft"))).eval()
    critic = tr.Critic(load_reward_model(str(tiny / "reward"))).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (n,), generator=generator).tolist() for n in (3, 9, 5, 2, 7)]
    query, query_mask = ro.left_pad(prompts, tokenizer.pad_token_id)
    response = torch.randint(5, 200, (5, 6), generator=generator)
    response_mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5])
    response = torch.where(response_mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    batch = ro.Rollout(query, query_mask, response, response_mask, response_mask[:, -1] == 0, [""] * 5,
                       [{}] * 5)
    temperature = 0.7
    with torch.no_grad():
        ids, attention, positions = ro.sequence_inputs(batch)
        logits = policy(input_ids=ids, attention_mask=attention, position_ids=positions).logits
        logits = logits[:, query.shape[1] - 1:-1].float() / temperature
        want = torch.log_softmax(logits, -1).gather(-1, response[..., None]).squeeze(-1)
        want_entropy = losses.entropy_from_logits(logits)
        got = ro.per_row(lambda part: ro.policy_forward(policy, part, temperature)[0], batch, 2)
        got_entropy = ro.per_row(lambda part: ro.policy_forward(policy, part, temperature, True)[1], batch, 3)
        values, want_values = ro.per_row(critic, batch, 2), critic(batch)
    mask = response_mask.bool()
    assert torch.allclose(got[mask], want[mask], atol=1e-5)
    assert torch.allclose(got_entropy[mask], want_entropy[mask], atol=1e-5)
    assert torch.allclose(values[mask], want_values[mask], atol=1e-5)
    assert ro.keep_last(policy, 7) == {"logits_to_keep": 7}
    trimmed = ro.trim_left_padding(ro.select(batch, [0, 3]))  # prompts of 3 and 2 tokens: 3 columns left
    assert trimmed.query.shape == (2, 3) and trimmed.texts == ["", ""]
    groups = [group for group, _ in ro.micro_batches(batch, 2)]
    assert groups == [[3, 0], [2, 4], [1]]  # by prompt length


@pytest.mark.parametrize("lora", [False, True])
def test_update_in_micro_batches_equals_one_forward(tmp_path, tiny, lora):
    """The update's forwards in length-grouped micro-batches of one episode (outputs joined before the loss, policy
    and critic backpropagated one after the other) train the same weights as whole-minibatch forwards."""
    from pipeline import models, schema
    from pipeline.models import load_causal_lm, load_reward_model, load_tokenizer
    from pipeline.rl import trainer as tr

    tokenizer = load_tokenizer(str(tiny / "sft"))
    rows = [{"prompt": [{"role": "user", "content": "Add " + " and ".join(["2"] * (i % 4 + 1)) + "."}],
             "answer": str(2 * (i % 4 + 1))} for i in range(8)]  # prompts of different lengths

    def train(forward_batch_size: int):
        torch.manual_seed(0)
        policy = load_causal_lm(str(tiny / "sft"), schema.ModelSection(path=str(tiny / "sft")))
        reference = None
        if lora:
            from peft import get_peft_model

            policy = get_peft_model(policy, models.lora_config(schema.LoraSection(dropout=0.0)))
        else:
            reference = tr.reference_copy(policy)
        m = tr.Models(policy=policy, critic=tr.Critic(load_reward_model(str(tiny / "reward"))),
                      reward=load_reward_model(str(tiny / "reward")), tokenizer=tokenizer, reference=reference)
        cfg = schema.PpoStage(kind="ppo", model="unused", reward_model="unused", data={"path": "unused"},
                              train={"learning_rate": 1e-3, "save_steps": 10 ** 6}, total_episodes=16,
                              rollout_batch_size=8, mini_batch_size=4, max_new_tokens=5,
                              forward_batch_size=forward_batch_size, rewards=[{"type": "exact_match"}])
        trainer = tr.PPOTrainer(cfg, m, rows, None)
        history = trainer.train()
        return history, [p.detach().clone() for p in list(policy.parameters()) + list(m.critic.parameters())]

    (whole, whole_weights), (micro, micro_weights) = train(8), train(1)
    for a, b in zip(whole, micro):
        for key in ("reward/mean", "kl", "loss/policy", "loss/value", "policy/entropy"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert max((a - b).abs().max().item() for a, b in zip(whole_weights, micro_weights)) < 1e-5


def test_lora_critic_trains_only_adapters_and_its_head(tmp_path, tiny):
    """`value_lora: true`: the critic's backbone stays frozen (no optimiser state for it), its LoRA weights and
    score head train, and the stage runs to an artifact."""
    from pipeline import schema
    from pipeline.models import load_reward_model
    from pipeline.rl import trainer as tr
    from pipeline.stages import ppo

    critic = tr.Critic(ppo.critic_lora(load_reward_model(str(tiny / "reward")), schema.LoraSection(r=4)))
    trainable = [name for name, p in critic.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "score" in name for name in trainable)
    assert any("score" in name for name in trainable)
    frozen = sum(p.numel() for p in critic.parameters() if not p.requires_grad)
    assert frozen > sum(p.numel() for p in critic.parameters() if p.requires_grad)
    artifact = run(write_recipe(tmp_path, tiny, lora={"r": 4, "alpha": 8, "dropout": 0.0}, value_lora=True))
    history = artifact.manifest["log_history"]
    assert [h["step"] for h in history] == [1, 2] and all(h["loss/value"] > 0 for h in history)


def test_explicit_bf16_runs_on_cpu(tmp_path, tiny):
    """`train.mixed_precision: bf16` holds on CPU (autocast), `auto` stays full precision there, fp16 is refused
    (no GPU); a bf16 run's losses are finite."""
    from pipeline import models
    from pipeline.errors import PipelineError

    if torch.cuda.is_available():
        pytest.skip("checks the CPU rule")
    assert models.mixed_precision("auto") == "no" and models.mixed_precision("bf16") == "bf16"
    with pytest.raises(PipelineError, match="fp16 needs a CUDA GPU"):
        models.mixed_precision("fp16")
    artifact = run(write_recipe(tmp_path, tiny, train={"learning_rate": 1e-3, "save_steps": 1,
                                                       "mixed_precision": "bf16"}))
    history = artifact.manifest["log_history"]
    assert len(history) == 2
    assert all(torch.isfinite(torch.tensor([h["loss/policy"], h["loss/value"], h["kl"]])).all() for h in history)


def test_reward_model_under_a_lora_critic_stays_frozen(tiny):
    """`value_lora` with the critic starting from the reward model keeps one copy of the weights: the reward model
    is the critic's adapters-off view, and its scores stay the original model's however the adapters and the
    critic's score head change."""
    from pipeline import schema
    from pipeline.models import load_reward_model
    from pipeline.rl import trainer as tr
    from pipeline.stages import ppo

    original = load_reward_model(str(tiny / "reward"))
    adapted = ppo.critic_lora(load_reward_model(str(tiny / "reward")), schema.LoraSection(r=4))
    critic, reward = tr.Critic(adapted), tr.WithoutAdapters(adapted)
    with torch.no_grad():
        for name, param in critic.named_parameters():
            if param.requires_grad:  # as if trained: adapters and the score head's trainable copy move
                param.add_(torch.randn_like(param))
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        adapters_on = adapted(input_ids=ids).logits
        assert torch.allclose(reward(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-6)
    assert not torch.allclose(adapters_on, original(input_ids=ids).logits, atol=1e-3)
    shared = {id(p) for p in critic.parameters()}
    assert all(id(p) in shared for p in reward.parameters())  # no second copy
    reward.requires_grad_(False).eval().to("cpu")  # what the trainer does to frozen models: the critic still trains
    assert any(p.requires_grad for p in critic.parameters())


def test_dropout_is_off_so_the_update_starts_at_the_rollouts_log_probs(tiny):
    """With LoRA dropout 0.5 in the recipe, the update's log-probs (training mode, autograd on) at unchanged
    weights equal the rollout's old log-probs: the importance ratio starts at exactly 1, as in TRL's PPOTrainer."""
    from peft import get_peft_model

    from pipeline import models, schema
    from pipeline.models import load_causal_lm, load_reward_model, load_tokenizer
    from pipeline.rl import rollout as ro
    from pipeline.rl import trainer as tr

    tokenizer = load_tokenizer(str(tiny / "sft"))
    policy = load_causal_lm(str(tiny / "sft"), schema.ModelSection(path=str(tiny / "sft")))
    policy = get_peft_model(policy, models.lora_config(schema.LoraSection(r=4, dropout=0.5)))
    critic = ppo_critic_with_dropout(tiny)
    m = tr.Models(policy=policy, critic=critic, reward=load_reward_model(str(tiny / "reward")), tokenizer=tokenizer)
    cfg = schema.PpoStage(kind="ppo", model="unused", reward_model="unused", data={"path": "unused"},
                          train={"save_steps": 10 ** 6}, total_episodes=4, rollout_batch_size=4, mini_batch_size=4,
                          max_new_tokens=5)
    rows = [{"prompt": [{"role": "user", "content": f"Add {i} and 2."}]} for i in range(4)]
    trainer = tr.PPOTrainer(cfg, m, rows, None)
    assert all(mod.p == 0 for mod in list(policy.modules()) + list(critic.modules())
               if isinstance(mod, torch.nn.Dropout))
    batch, _ = trainer.collect()
    policy.train()
    logprobs, _ = ro.policy_forward(policy, batch, cfg.temperature)
    mask = batch.response_mask.bool()
    assert torch.allclose(logprobs[mask], batch.experience.old_logprobs[mask], atol=1e-6)


def ppo_critic_with_dropout(tiny: Path):
    from pipeline import schema
    from pipeline.models import load_reward_model
    from pipeline.rl import trainer as tr
    from pipeline.stages import ppo

    return tr.Critic(ppo.critic_lora(load_reward_model(str(tiny / "reward")), schema.LoraSection(r=4, dropout=0.5)))


def test_frozen_weights_stored_in_bf16_give_the_same_autocast_results():
    """`lower_frozen_weights` stores frozen linear layers in bf16, as CPU autocast casts them at every call: the
    logits are bit-identical, the LoRA weights and the embedding (tied to the LM head) keep float32."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import models, schema
    from pipeline.rl import trainer as tr

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    policy = get_peft_model(LlamaForCausalLM(config), models.lora_config(schema.LoraSection(r=4, dropout=0.0)))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:  # as if trained: the adapters change the output
                param.normal_()
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = policy(input_ids=ids).logits
        assert tr.lower_frozen_weights([policy, None], torch.bfloat16) == 2 * 7  # q k v o gate up down per layer
        after = policy(input_ids=ids).logits
    assert torch.equal(before, after)
    dtypes = {name: p.dtype for name, p in policy.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if "lora_" in name or "embed" in name)
    assert policy.get_base_model().lm_head.weight.dtype == torch.float32
    assert tr.lower_frozen_weights([policy], torch.bfloat16) == 0  # nothing left to lower


def test_bf16_lora_ppo_merges_into_the_exact_base(tmp_path, tiny):
    """A bf16 PPO run that merges its adapter keeps the policy's frozen weights in float32, so the merged model's
    untouched layers equal the starting model's bit for bit (the reference, critic and reward run lowered)."""
    artifact = run(write_recipe(tmp_path, tiny, lora={"r": 4, "alpha": 8, "dropout": 0.0, "merge": True,
                                                      "target_modules": ["q_proj", "v_proj"]},
                                train={"learning_rate": 1e-3, "save_steps": 1, "mixed_precision": "bf16"}))
    merged, start = weights(Path(artifact.path)), weights(tiny / "sft")
    name = "model.layers.0.mlp.down_proj.weight"
    assert merged[name].dtype == torch.float32 and torch.equal(merged[name], start[name])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           start["model.layers.0.self_attn.q_proj.weight"])
