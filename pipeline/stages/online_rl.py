"""Glue shared by the `grpo` and `rloo` stages (TRL's GRPOTrainer and RLOOTrainer take the same inputs): reward
functions from the stage config (a learned reward model and/or rule rewards on the data's `answer` column), the
prompt dataset, the trainer config, held-out metrics before and after, and saving the policy.

Not a stage itself: `pipeline.stages.grpo.run(ctx)` and `pipeline.stages.rloo.run(ctx)` call `run_online(...)`
with their trainer and config classes, when `python -m pipeline run recipe.yaml` reaches such a stage.
Nothing runs at import.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

from pipeline import data as data_lib
from pipeline import models, training
from pipeline.eval import answers, measures
from pipeline.errors import PipelineError
from pipeline.rl.engines import make_engine, step_seeds
from pipeline.rl import tools as tools_lib
from pipeline.rl.rewards import rule_rewards
from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import load_policy, load_stage_data, run_trainer, tags

TRAINER_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")  # TRL extras, not data columns


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes conversational completions as a list of messages (with tools: the
    assistant's turns and the tool results between them); the answer is the last assistant turn's text."""
    if isinstance(completion, list):
        said = [m for m in completion if m.get("role", "assistant") == "assistant"]
        return (said[-1].get("content") or "") if said else ""
    return str(completion)


def rule_reward(prompts: list, completions: list, rules: Sequence = (), **columns: Any) -> list[float]:
    """A TRL reward function: `schema.RuleReward` rules scored on each completion against its data row."""
    data = {k: v for k, v in columns.items() if k not in TRAINER_KWARGS and k != "completion_ids"}
    rows = [{k: v[i] for k, v in data.items()} for i in range(len(completions))]
    return rule_rewards(rules, [completion_text(c) for c in completions], rows)


def reward_model_score(prompts: list, completions: list, model=None, tokenizer=None, **_: Any) -> list[float]:
    """A TRL reward function: the learned reward model's score of each (prompt, completion)."""
    as_messages = [p if isinstance(p, list) else [{"role": "user", "content": str(p)}] for p in prompts]
    answers = [[{"role": "assistant", "content": completion_text(c)}] for c in completions]
    return measures.reward_scores(model, tokenizer, as_messages, answers, batch_size=len(answers))


def load_reward_model(ctx: StageContext):
    """(reward model, its tokenizer) from `reward_model:` (e.g. ${reward}), or (None, None) when unset."""
    path = ctx.resolve(ctx.config.reward_model)
    if not path:
        return None, None
    tokenizer = models.load_tokenizer(path)
    model = models.load_reward_model(path)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval().requires_grad_(False)
    return model, tokenizer


def reward_functions(cfg, reward_model, reward_tokenizer) -> tuple[list, list]:
    """(reward_funcs, reward_processing_classes) for the TRL trainer; TRL sums them with weight 1 each."""
    funcs, classes = [], []
    if reward_model is not None:  # scored as the reward stage trained it (measures.reward_text)
        # TRL logs it as rewards/reward_model_score/*
        funcs.append(functools.partial(reward_model_score, model=reward_model, tokenizer=reward_tokenizer))
        classes.append(None)
    if cfg.rewards:
        funcs.append(functools.partial(rule_reward, rules=list(cfg.rewards)))
        classes.append(None)
    return funcs, classes


def check_group_size(ctx: StageContext) -> None:
    """TRL needs each generation batch to hold whole groups of `num_generations` completions."""
    cfg = ctx.config
    per_step = cfg.train.batch_size * cfg.train.grad_accum * ctx.state.num_processes
    if per_step % cfg.num_generations:
        raise PipelineError(
            f"train.batch_size x train.grad_accum x processes = {per_step} is not a multiple of num_generations "
            f"({cfg.num_generations})", key=f"stages.{ctx.name}.num_generations",
            fix="make train.batch_size (or grad_accum) a multiple of num_generations")


def trainer_config(ctx: StageContext, config_cls, **extra: Any):
    """GRPOConfig / RLOOConfig from the `train:` section and the stage's generation fields."""
    cfg = ctx.config
    return config_cls(**training.trainer_kwargs(ctx, cfg.train), num_generations=cfg.num_generations,
                      max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, beta=cfg.beta,
                      log_completions=False, **extra)


def eval_prompts(loaded, limit: int):
    """The first `limit` held-out prompts, or None when the data has no eval split."""
    if loaded.eval is None or len(loaded.eval) == 0:
        return None
    return loaded.eval.select(range(min(limit, len(loaded.eval))))


Answer = Callable[..., list[str]]  # (prompts, sample=bool, seeds=list|None) -> decoded completions


def generated_answers(model, tokenizer, cfg) -> Answer:
    """Held-out answers from transformers `generate` on `model` (the `hf` engine)."""
    def answer(prompts: list, *, sample: bool, seeds: list[int] | None) -> list[str]:
        return measures.generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                                 temperature=cfg.temperature)

    return answer


def tool_answers(model, tokenizer, cfg) -> Answer:
    """Held-out answers with the stage's tools, as TRL's GRPO tool loop runs them: generate; while a completion
    holds tool calls (at most `max_tool_calls` rounds), run them, append the call and its results to the
    conversation and generate again; the answer is the last turn's text."""
    functions = tools_lib.functions(cfg.tools)

    def answer(prompts: list, *, sample: bool, seeds: list[int] | None) -> list[str]:
        conversations = [list(p) for p in prompts]
        finals = measures.generate(model, tokenizer, conversations, max_new_tokens=cfg.max_new_tokens,
                                   do_sample=sample, temperature=cfg.temperature, tools=functions)
        for _ in range(cfg.max_tool_calls):
            calling = [i for i, text in enumerate(finals) if tools_lib.parse_calls(text)]
            if not calling:
                break
            for i in calling:
                calls = tools_lib.parse_calls(finals[i])
                conversations[i].append({"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": name, "arguments": args}} for name, args in calls]})
                conversations[i] += [{"role": "tool", "name": name, "content": tools_lib.call(name, args, cfg.tools)}
                                     for name, args in calls]
            again = measures.generate(model, tokenizer, [conversations[i] for i in calling],
                                      max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                                      temperature=cfg.temperature, tools=functions)
            for i, text in zip(calling, again):
                finals[i] = text
        return finals

    return answer


def engine_answers(engine, tokenizer, cfg) -> Answer:
    """Held-out answers from the stage's vLLM engine (its weights already the measured model's), each sampled
    answer from its own seed, rendered as TRL renders its prompts."""
    def answer(prompts: list, *, sample: bool, seeds: list[int] | None) -> list[str]:
        _, completions = engine_completions(engine, tokenizer, prompts, seeds or [None] * len(prompts),
                                            cfg.max_new_tokens, cfg.temperature if sample else 0.0)
        return [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]

    return answer


def measure_policy(answer: Answer, dataset, cfg, reward_model, reward_tokenizer, suffix: str,
                   seed: int) -> dict[str, float]:
    """Held-out prompts answered greedily (`eval_reward_*`, `eval_rule_reward_*`, `eval_exact_match_*`) and sampled
    at the training temperature, `eval_samples` answers per prompt (`eval_sampled_reward_*`, ...): the distribution
    the trainer optimises, drawn from `seed` so that before and after compare like with like."""
    prompts, rows = dataset["prompt"], list(dataset)
    greedy = answer(prompts, sample=False, seeds=None)
    metrics = answer_measures(greedy, prompts, rows, cfg, reward_model, reward_tokenizer, suffix, "")
    repeated = [i for i in range(len(rows)) for _ in range(cfg.eval_samples)]
    with measures.seeded_sampling(seed):
        sampled = answer([prompts[i] for i in repeated], sample=True, seeds=step_seeds(seed, -1, len(repeated)))
    metrics.update(answer_measures(sampled, [prompts[i] for i in repeated], [rows[i] for i in repeated], cfg,
                                   reward_model, reward_tokenizer, suffix, "sampled_"))
    return metrics


def answer_measures(predictions: list[str], prompts: list, rows: list[dict], cfg, reward_model, reward_tokenizer,
                    suffix: str, prefix: str) -> dict[str, float]:
    """Mean reward-model score, mean rule reward and exact match of answers to held-out prompts."""
    metrics: dict[str, float] = {}
    if reward_model is not None:
        completions = [[{"role": "assistant", "content": p}] for p in predictions]
        scores = measures.reward_scores(reward_model, reward_tokenizer, prompts, completions)
        metrics[f"eval_{prefix}reward_{suffix}"] = sum(scores) / len(scores)
    if cfg.rewards:
        rules = rule_rewards(cfg.rewards, predictions, rows)
        metrics[f"eval_{prefix}rule_reward_{suffix}"] = sum(rules) / len(rules)
    answered = [(p, row["answer"]) for p, row in zip(predictions, rows) if row.get("answer") is not None]
    if answered:
        metrics[f"eval_{prefix}exact_match_{suffix}"] = answers.exact_match(*map(list, zip(*answered)))
    return metrics


def held_out_measures(ctx: StageContext, tokenizer, evalset, reward_model, reward_tokenizer, engine):
    """`measure_policy` before and after training (on the process's device), and the number of prompts after. On a
    vLLM engine the answers come from the server: before training it holds the starting weights; after, the trained
    ones are pushed first."""
    def measure(model, phase: str) -> dict[str, Any]:
        if phase == "before":
            model.to(ctx.state.device)
            if reward_model is not None:
                reward_model.to(ctx.state.device)
        if getattr(ctx.config, "tools", None):
            answer = tool_answers(model, tokenizer, ctx.config)
        elif engine.name == "hf":
            answer = generated_answers(model, tokenizer, ctx.config)
        else:
            if phase == "after":
                engine.sync(model, "trained")
            answer = engine_answers(engine, tokenizer, ctx.config)
        metrics = measure_policy(answer, evalset, ctx.config, reward_model, reward_tokenizer, phase, ctx.seed)
        return metrics if phase == "before" else {**metrics, "eval_prompts": len(evalset)}

    return measure


def engine_completions(engine, tokenizer, prompts: list, seeds: list, max_new_tokens: int, temperature: float):
    """The chat `prompts` rendered with the generation prompt as TRL renders its own, and one completion each from
    the engine (prompt i drawn with seeds[i]; temperature 0: greedy): (prompt ids, completions)."""
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in prompts]
    completions = engine.complete(ids, seeds, max_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                                  stop_token_ids=[tokenizer.eos_token_id])
    return ids, completions


def engine_rollouts(engine, tokenizer, cfg, seed: int):
    """TRL's `rollout_func` on a `pipeline.rl.engines` engine: before sampling, the engine gets the trainer's
    policy when its optimiser step moved; then one completion per prompt it is given (TRL's sampler already repeats
    each prompt `num_generations` times), each from its own seed (the step's and the prompt's), rendered with the
    chat template as TRL renders its own prompts. Returns the prompt and completion ids and the engine's log-probs."""
    def rollout_func(prompts: list, trainer) -> dict[str, list]:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        engine.sync(policy, trainer.state.global_step)
        rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
        seeds = step_seeds(seed, trainer.state.global_step, len(prompts), rank, world)
        ids, completions = engine_completions(engine, tokenizer, prompts, seeds, cfg.max_new_tokens, cfg.temperature)
        return {"prompt_ids": ids, "completion_ids": [c.token_ids for c in completions],
                "logprobs": [c.logprobs for c in completions]}

    return rollout_func


def run_online(ctx: StageContext, trainer_cls, config_cls, tag: str, **config_extra: Any) -> StageResult:
    """Train the policy with `trainer_cls` (GRPOTrainer or RLOOTrainer) and save it like the `sft` stage; with
    `rollout: {engine: vllm}` (GRPO) its rollouts come from a vLLM server through TRL's `rollout_func`."""
    cfg = ctx.config
    check_group_size(ctx)
    model, tokenizer, base = load_policy(ctx)
    reward_model, reward_tokenizer = load_reward_model(ctx)
    loaded = load_stage_data(ctx)
    evalset = eval_prompts(loaded, cfg.eval_prompts)
    funcs, classes = reward_functions(cfg, reward_model, reward_tokenizer)
    engine = make_engine(ctx, model, tokenizer, cfg.lora.r if cfg.lora else None,
                         models.mixed_precision(cfg.train.mixed_precision), cfg.train.max_length)
    hook = {} if engine.name == "hf" else {"rollout_func": engine_rollouts(engine, tokenizer, cfg, ctx.seed)}
    if getattr(cfg, "tools", None):  # grpo's (the schema refuses tools on vllm rollouts)
        hook["tools"] = tools_lib.functions(cfg.tools)
        config_extra["max_tool_calling_iterations"] = cfg.max_tool_calls
    try:
        return run_trainer(
            ctx, tokenizer=tokenizer, model=model, loaded=loaded, metrics={"train_prompts": len(loaded.train)},
            measure=held_out_measures(ctx, tokenizer, evalset, reward_model, reward_tokenizer, engine)
            if evalset is not None else None,
            make_trainer=lambda: trainer_cls(model=model, reward_funcs=funcs,
                                             args=trainer_config(ctx, config_cls, **config_extra),
                                             train_dataset=loaded.train, processing_class=tokenizer,
                                             reward_processing_classes=classes,
                                             peft_config=models.lora_config(cfg.lora) if cfg.lora else None, **hook),
            base_model=base, tags=tags(ctx, tag))
    finally:
        engine.close()
