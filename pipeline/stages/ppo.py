"""`ppo` stage: our own PPO (pipeline.rl) on Accelerate. Policy = `model` (full or LoRA), frozen reference = the
same starting policy (the base with the adapter disabled under LoRA), critic initialised from `value_model` (default
the reward model) or a value head, reward = `reward_model` score + rule `rewards` (either alone: rules alone train on
verifiable rewards, with a value head or `value_model` for the critic).

Launched as part of a recipe: `python -m pipeline run recipes/quickstart.yaml`. Metrics: held-out mean reward and
exact-match accuracy (greedy) of the starting policy and the PPO policy, and the final KL to the reference.
Nothing runs at import.
"""
from __future__ import annotations

from typing import Any

from pipeline import data as data_lib
from pipeline import models, parallel, schema, tracking
from pipeline.course import run_course
from pipeline.errors import PipelineError
from pipeline.eval import answers, measures
from pipeline.rl import rollout as ro
from pipeline.rl import trainer as tr
from pipeline.rl.engines import make_engine, step_seeds
from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import load_policy, load_stage_data, tags


def build_models(ctx: StageContext, policy, tokenizer) -> tr.Models:
    """Reward model, critic and reference around the loaded policy (LoRA applied here when configured)."""
    cfg = ctx.config
    reward, reward_tokenizer, reward_path = load_reward(ctx.resolve(cfg.reward_model))
    same_vocab = reward_tokenizer is None or reward_tokenizer.get_vocab() == tokenizer.get_vocab()
    reference = None
    if cfg.lora is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, models.lora_config(cfg.lora))
    else:
        reference = tr.reference_copy(policy)
    if cfg.value_head:
        critic = tr.ValueHead(policy)
    elif cfg.value_lora and reward is not None and same_vocab and ctx.resolve(cfg.value_model) in (None, reward_path):
        adapted = critic_lora(reward, cfg.lora)  # one copy of the weights: the reward model is the adapters-off view
        critic, reward = tr.Critic(adapted), tr.WithoutAdapters(adapted)
    else:
        critic_model = models.load_reward_model(ctx.resolve(cfg.value_model) or reward_path)
        critic_model.config.pad_token_id = tokenizer.pad_token_id
        critic = tr.Critic(critic_lora(critic_model, cfg.lora) if cfg.value_lora else critic_model)
    return tr.Models(policy=policy, critic=critic, reward=reward, tokenizer=tokenizer, reference=reference,
                     reward_tokenizer=None if same_vocab else reward_tokenizer)


def load_reward(path: str | None):
    """(reward model, its tokenizer, its path), or three Nones when the stage scores with rules alone."""
    if path is None:
        return None, None, None
    reward, reward_tokenizer = models.load_reward_model(path), models.load_tokenizer(path)
    reward.config.pad_token_id = reward_tokenizer.pad_token_id
    return reward, reward_tokenizer, path


def critic_lora(critic_model, section: schema.LoraSection | None):
    """The critic with LoRA adapters on its backbone and a trainable copy of its score head (peft's SEQ_CLS task)."""
    from peft import get_peft_model

    return get_peft_model(critic_model, models.lora_config(section or schema.LoraSection(), task_type="SEQ_CLS"))


def evaluate(policy, m: tr.Models, rows: list[dict[str, Any]], cfg, seed: int, synced: bool = False,
             kl: bool = False, engine=None) -> dict[str, float]:
    """The policy on held-out prompts: greedy answers (mean reward, exact match) and answers sampled at the training
    temperature, `eval_samples` per prompt (`sampled_reward`, `sampled_accuracy`, and with `kl` the KL to the frozen
    reference `m.reference`), drawn from `seed` so that before and after compare like with like. Rewards are the
    stage's own (reward model + rules). Every rank evaluates the same prompts; `synced` when the policy is sharded
    (FSDP). `engine`: the stage's rollout engine (None: `generate` on the policy), its weights already the policy's."""
    if not rows:
        return {}
    import torch

    prompt_ids = ro.encode_prompts(m.tokenizer, rows)
    batch = ro.rollout(policy, m.tokenizer, rows, prompt_ids, cfg, do_sample=False, synced_gpus=synced,
                       engine=engine)
    with torch.no_grad():  # not inference_mode: FSDP2 reuses the gathered weights in training
        rewards = ro.score(m.reward, m.tokenizer, batch, cfg, m.reward_tokenizer)
    out = {"reward": rewards.mean().item()}
    if has_answers(rows):
        out["accuracy"] = answers.exact_match(batch.texts, [row["answer"] for row in rows])
    with measures.seeded_sampling(seed):
        out.update(sampled_evaluation(policy, m, rows, cfg, synced, kl, engine, seed))
    return out


def has_answers(rows: list[dict[str, Any]]) -> bool:
    return all(row.get("answer") is not None for row in rows)


def sampled_evaluation(policy, m: tr.Models, rows: list[dict[str, Any]], cfg, synced: bool = False,
                       kl: bool = False, engine=None, seed: int = 0) -> dict[str, float]:
    """Mean reward, exact match and (with `kl`) KL of `eval_samples` sampled answers per prompt, generated in
    batches of `rollout_batch_size` (by `engine`, each answer from its own seed, the same before and after). KL:
    mean over answers of the sum over tokens of log pi(y) - log ref(y)."""
    import torch

    repeated = [row for row in rows for _ in range(cfg.eval_samples)]
    rewards, texts, kls = [], [], []
    for start in range(0, len(repeated), cfg.rollout_batch_size):
        chunk = repeated[start:start + cfg.rollout_batch_size]
        batch = ro.rollout(policy, m.tokenizer, chunk, ro.encode_prompts(m.tokenizer, chunk), cfg, do_sample=True,
                           synced_gpus=synced, engine=engine, seeds=step_seeds(seed, -1 - start, len(chunk)))
        texts += batch.texts
        with torch.no_grad():  # not inference_mode: FSDP2 reuses the gathered weights in training
            rewards += ro.score(m.reward, m.tokenizer, batch, cfg, m.reward_tokenizer).tolist()
            if kl:
                kls += sequence_kl(policy, m.reference, batch, cfg).tolist()
    out = {"sampled_reward": sum(rewards) / len(rewards)}
    if has_answers(rows):
        out["sampled_accuracy"] = answers.exact_match(texts, [row["answer"] for row in repeated])
    if kls:
        out["kl"] = sum(kls) / len(kls)
    return out


def sequence_kl(policy, reference, batch, cfg):
    """Per answer: the sum over its tokens of log pi(y) - log ref(y) (`reference` None: the policy's own base under
    its LoRA adapter)."""
    logp = ro.logprobs(policy, batch, cfg)
    ref = ro.reference_logprobs(policy, reference, batch, cfg)
    return ((logp - ref) * batch.response_mask).sum(1)


def eval_rows(loaded, cfg) -> list[dict[str, Any]]:
    data = loaded.eval if loaded.eval is not None else loaded.train
    return [data[i] for i in range(min(len(data), cfg.eval_prompts))]


def refuse_sharding(ctx: StageContext) -> None:
    """PPO runs with whole models per rank (one process, DDP, ZeRO-1/2) or sharded by FSDP. DeepSpeed ZeRO-3 and
    tensor/context parallelism would need their own generation and gathering code, so such a launch stops here,
    before any model is loaded."""
    sharding = parallel.sharding_in_launch(ctx.recipe.header.parallelism)
    if sharding is None or ctx.state.num_processes <= 1:
        return
    if sharding != "FSDP":
        raise PipelineError(f"the ppo stage does not run under {sharding}", key=f"stages.{ctx.name}",
                            fix="launch it with FSDP2 (recipes/accelerate/fsdp2.yaml) or DDP; run the other "
                                "stages with this launch and ppo separately with `--only`")
    if ctx.config.value_lora:
        raise PipelineError("value_lora: true shares the reward model's weights with the critic, which FSDP shards",
                            key=f"stages.{ctx.name}.value_lora",
                            fix="under FSDP leave value_lora off (a fully trained critic), or launch with DDP")
    if ctx.config.value_head:
        raise PipelineError("value_head: true shares the policy's trunk, which FSDP shards as a separate model",
                            key=f"stages.{ctx.name}.value_head",
                            fix="under FSDP use a separate critic (leave value_head off: the critic starts from "
                                "the reward model or `value_model`), or launch with DDP")


def check_batches_split(ctx: StageContext) -> None:
    """Each rank samples its share of every rollout batch and minibatch, so both must divide by the ranks."""
    world, cfg = ctx.state.num_processes, ctx.config
    for key in ("rollout_batch_size", "mini_batch_size"):
        value = getattr(cfg, key)
        if value % world:
            raise PipelineError(f"{key} {value} does not split over {world} processes", key=f"stages.{ctx.name}.{key}",
                                fix=f"use a multiple of {world} (it is the global batch, shared by all ranks)")


class PPOLoop:
    """Our PPO trainer as a `pipeline.course.Loop`. Its checkpoint holds the policy's weights and the starting
    policy's held-out measures, so a resumed stage keeps those instead of measuring its half-trained policy."""

    def __init__(self, trainer: tr.PPOTrainer):
        self.trainer, self.accelerator = trainer, trainer.accelerator

    def resume(self) -> int:
        self.trainer.load_checkpoint()
        return self.trainer.state.step

    def starting_metrics(self, measure) -> dict[str, Any]:
        if self.trainer.state.before is None:
            self.trainer.state.before = measure(self.trained_model(), "before")
        return self.trainer.state.before

    def fit(self, hooks) -> None:
        self.trainer.train(hooks)

    def fit_metrics(self) -> dict[str, Any]:
        return {}

    def trained_model(self):
        return self.accelerator.unwrap_model(self.trainer.m.policy)

    def log_history(self) -> list[dict[str, Any]]:
        return self.trainer.state.log_history

    def save(self, ctx: StageContext, tokenizer) -> str:
        return models.save_gathered(ctx, self.accelerator, self.trainer.m.policy, tokenizer)


def held_out_measures(trainer: tr.PPOTrainer, rows: list[dict[str, Any]], seed: int):
    """The course's measure: `evaluate` at the run's precision (as training samples and scores), as
    `eval_<measure>_before` / `_after`, and after training the KL to the reference as `kl`."""
    def measure(policy, phase: str) -> dict[str, Any]:
        trainer.engine.sync(policy, trainer.state.step)
        with trainer.accelerator.autocast():
            found = evaluate(policy, trainer.m, rows, trainer.cfg, seed, trainer.sharded, kl=phase == "after",
                             engine=trainer.engine)
        out = {f"eval_{k}_{phase}": v for k, v in found.items() if k != "kl"}
        return {**out, "kl": found["kl"]} if "kl" in found else out

    return measure


def run(ctx: StageContext) -> StageResult:
    refuse_sharding(ctx)
    check_batches_split(ctx)
    cfg = ctx.config
    policy, tokenizer, base = load_policy(ctx)
    loaded = load_stage_data(ctx, too_long=data_lib.too_long_for(tokenizer, cfg.train.max_length - cfg.max_new_tokens))
    m = build_models(ctx, policy, tokenizer)
    held_out = eval_rows(loaded, cfg)
    engine = make_engine(ctx, m.policy, tokenizer, cfg.lora.r if cfg.lora else None,
                         models.mixed_precision(cfg.train.mixed_precision), cfg.train.max_length)
    try:
        trainer = tr.PPOTrainer(cfg, m, [loaded.train[i] for i in range(len(loaded.train))], ctx.work_dir, ctx.seed,
                                trackers=tracking.accelerate_trackers(ctx),
                                tracker_config=tracking.flat(tracking.resolved_config(ctx)), engine=engine)
        metrics = {"train_prompts": len(loaded.train), "eval_prompts": len(held_out), "steps": trainer.total_steps,
                   "episodes": trainer.total_steps * cfg.rollout_batch_size}
        return run_course(ctx, PPOLoop(trainer), tokenizer=tokenizer, loaded=loaded, metrics=metrics,
                          measure=held_out_measures(trainer, held_out, ctx.seed), base_model=base,
                          tags=tags(ctx, "ppo"))
    finally:
        engine.close()
