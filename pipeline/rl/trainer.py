"""The PPO loop on Accelerate: rollout -> reference log-probs, values, scores -> KL-penalised rewards -> GAE ->
minibatch epochs of clipped policy + value updates, with logging, checkpoints and resume.

Built by `pipeline.stages.ppo.run(ctx)` (launched via `python -m pipeline run recipe.yaml`, or `accelerate launch -m
pipeline run ...`); `bench/ppo.py` drives it directly. Nothing runs at import.
"""
from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.console import Console
from pipeline.errors import TrainingError
from pipeline.models import is_sharded, mixed_precision
from pipeline.rl import advantages as adv
from pipeline.rl import losses
from pipeline.rl import rollout as ro
from pipeline.rl.engines import HFEngine, step_seeds

log = logging.getLogger("pipeline")
CHECKPOINT = "ppo-checkpoint.pt"


class Critic(torch.nn.Module):
    """Per-token values from a sequence-classification model's backbone and its `score` head. Given a peft model
    (LoRA on the backbone, the head in `modules_to_save`), it keeps the model peft wraps, whose layers carry the
    adapters and the trainable head."""

    def __init__(self, model):
        super().__init__()
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP shards the model's layers

    def forward(self, batch: ro.Rollout) -> torch.Tensor:
        ids, attention, positions = ro.sequence_inputs(batch)
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=ids, attention_mask=attention, position_ids=positions,
                          use_cache=False).last_hidden_state
        start = batch.query.shape[1] - 1
        return self.model.score(hidden[:, start:start + batch.response.shape[1]]).squeeze(-1).float()


class WithoutAdapters:
    """A peft model seen with its adapters off: the frozen model it was made from. Under `value_lora` the critic is
    the reward model plus LoRA adapters, so the reward model costs no second copy of the weights. Not a module:
    freezing, moving or switching modes of "the reward model" must not touch the critic's adapters."""

    def __init__(self, peft_model):
        self.peft_model = peft_model
        self.config = peft_model.config

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)

    def parameters(self):
        return self.peft_model.parameters()

    def requires_grad_(self, requires_grad: bool = True) -> "WithoutAdapters":
        return self  # the adapters train with the critic; the rest is frozen by peft already

    def eval(self) -> "WithoutAdapters":
        return self

    def to(self, *args, **kwargs) -> "WithoutAdapters":
        return self  # the critic (the same weights) is placed by Accelerate


class ValueHead(torch.nn.Module):
    """A linear value head on the policy's last hidden state (shares the policy's trunk)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = [policy]  # not a submodule: its weights belong to the policy optimiser
        self.head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, batch: ro.Rollout) -> torch.Tensor:
        ids, attention, positions = ro.sequence_inputs(batch)
        out = self.policy[0](input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False,
                             output_hidden_states=True)
        start = batch.query.shape[1] - 1
        hidden = out.hidden_states[-1][:, start:start + batch.response.shape[1]]
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()


@dataclass
class Models:
    """The four roles. `reference` is None under LoRA (the policy with its adapter disabled is the reference)."""

    policy: Any
    critic: torch.nn.Module
    reward: Any
    tokenizer: Any
    reference: Any = None
    reward_tokenizer: Any = None


@dataclass
class TrainState:
    step: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, float] | None = None  # the stage's held-out metrics of the starting policy (kept on resume)


def release_other_precision(precision: str) -> None:
    """Accelerate keeps one process-wide state whose mixed precision cannot change; an earlier stage of the same
    run (a Trainer under another `mixed_precision`) may have set it. Forget that state, keeping the process group."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def disable_dropout(*holders) -> None:
    """Dropout off in every model PPO runs, as TRL's PPOTrainer does: the rollout's log-probs come from the policy
    in eval mode, so with dropout on in the update the importance ratio would differ from 1 at unchanged weights and
    clipping would measure dropout noise. (It also spares drawing a dropout mask at every LoRA layer.)"""
    for holder in holders:
        if isinstance(holder, torch.nn.Module):
            for module in holder.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0


def lower_frozen_weights(holders, dtype: torch.dtype) -> int:
    """Store the frozen `nn.Linear` weights and biases of `holders` in `dtype`, the run's autocast precision, and
    return how many layers changed. Autocast casts them to `dtype` at every call anyway, so the results are the
    same; what goes is that cast at every forward (and generation step), the low-precision copy autograd keeps for
    the backward pass, and half their memory. Weights tied to an embedding stay as they are (embeddings run outside
    autocast). Everything that runs these models afterwards must run under autocast. Only frozen layers change:
    trainable weights and optimiser states keep full precision."""
    modules = [m for h in holders if isinstance(h, torch.nn.Module) for m in h.modules()]
    tied = {id(m.weight) for m in modules if isinstance(m, torch.nn.Embedding)}
    lowered = 0
    for module in {id(m): m for m in modules}.values():
        if not isinstance(module, torch.nn.Linear) or id(module.weight) in tied:
            continue
        params = [p for p in (module.weight, module.bias) if p is not None]
        if any(p.requires_grad for p in params) or all(p.dtype == dtype for p in params):
            continue
        for param in params:
            param.data = param.data.to(dtype)
        lowered += 1
    return lowered


class PPOTrainer:
    """Holds models, optimisers and the KL controller; `train()` runs `total_episodes` episodes. `trackers`
    (Accelerate tracker objects, pipeline.tracking.accelerate_trackers) receive `tracker_config` once and every
    step's log entry, on the step axis of `log_history`. `engine` (pipeline.rl.engines) samples the rollouts:
    None is transformers `generate` on the policy."""

    def __init__(self, cfg, models: Models, train_rows: list[dict], work_dir: Path | None, seed: int = 0,
                 trackers: list | None = None, tracker_config: dict[str, Any] | None = None, engine=None):
        from accelerate import Accelerator

        self.cfg, self.m, self.work_dir, self.seed = cfg, models, work_dir, seed
        self.engine = engine or HFEngine()
        self.tracker_config = tracker_config
        precision = mixed_precision(cfg.train.mixed_precision)  # an explicit bf16 holds on CPU too
        release_other_precision(precision)
        self.accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=1,
                                       log_with=trackers or None)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.sharded = is_sharded(self.accelerator)  # FSDP: no rank holds whole weights
        disable_dropout(models.policy, models.critic, models.reference, models.reward)
        merged_later = cfg.lora is not None and cfg.lora.merge  # the policy's base must stay exact to merge into it
        holders = [models.critic, models.reference, models.reward] + ([] if merged_later else [models.policy])
        if precision == "bf16" and not self.sharded:
            lower_frozen_weights(holders, torch.bfloat16)
        self.rows = train_rows
        self.prompt_ids = ro.encode_prompts(models.tokenizer, train_rows)
        self.state = TrainState()
        self.kl_ctl = (losses.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else losses.FixedKLController(cfg.kl_coef))
        self._build_optimizers()
        self.order_gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.checkpoint_checked = False  # load_checkpoint runs once, before any forward pass (see its docstring)

    # ------------------------------------------------------------------------------------------------ setup

    def _build_optimizers(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        policy_params = [p for p in self.m.policy.parameters() if p.requires_grad]
        critic_params = [p for p in self.m.critic.parameters() if p.requires_grad]
        self.policy_opt = torch.optim.AdamW(policy_params, lr=cfg.train.learning_rate, eps=1e-5,
                                            weight_decay=cfg.train.weight_decay)
        self.critic_opt = torch.optim.AdamW(critic_params, lr=cfg.value_learning_rate or cfg.train.learning_rate,
                                            eps=1e-5)
        # one model per prepare call: Accelerate's FSDP2 path shards a single model with its optimiser at a time
        self.m.policy, self.policy_opt = acc.prepare(self.m.policy, self.policy_opt)
        self.m.critic, self.critic_opt = acc.prepare(self.m.critic, self.critic_opt)
        for frozen in (self.m.reward, self.m.reference):
            if frozen is not None:
                frozen.requires_grad_(False).eval().to(acc.device)

    @property
    def total_steps(self) -> int:
        return max(1, self.cfg.total_episodes // self.cfg.rollout_batch_size)

    def _next_rows(self) -> list[int]:
        """This rank's share of the next prompt batch. Every rank draws the same global batch of
        `rollout_batch_size` (a seeded reshuffle each pass over the data) and keeps every `world`-th prompt, so
        the ranks sample disjoint prompts and together cover exactly what one process would."""
        needed = self.cfg.rollout_batch_size
        while len(self.order) < needed:
            self.order += torch.randperm(len(self.rows), generator=self.order_gen).tolist()
        picked, self.order = self.order[:needed], self.order[needed:]
        return picked[self.rank::self.world]

    def _mean_over_ranks(self, stats: dict[str, float]) -> dict[str, float]:
        """Each statistic averaged over the ranks (one all-reduce), so every rank logs the same numbers."""
        if self.world == 1:
            return stats
        keys = sorted(stats)
        values = torch.tensor([stats[k] for k in keys], device=self.accelerator.device, dtype=torch.float64)
        return dict(zip(keys, self.accelerator.reduce(values, "mean").tolist()))

    def _all(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` from every rank, concatenated along dim 0 (itself with one process)."""
        return self.accelerator.gather(tensor.contiguous()) if self.world > 1 else tensor

    # ------------------------------------------------------------------------------------------ experience

    def _per_row(self, fn, batch: ro.Rollout) -> torch.Tensor:
        """`fn` over micro-batches of `forward_batch_size` episodes (similar prompt lengths together), in row order."""
        return ro.per_row(fn, batch, self.cfg.forward_batch_size)

    def collect(self) -> tuple[ro.Rollout, dict[str, float]]:
        """Sample a batch and attach old log-probs, reference log-probs, values, scores, rewards and advantages.
        The scoring passes run without autograd in micro-batches of `forward_batch_size` episodes."""
        cfg, times = self.cfg, {}
        idx = self._next_rows()
        rows = [self.rows[i] for i in idx]
        policy = self.accelerator.unwrap_model(self.m.policy)
        policy.eval()
        if self.engine.name != "hf":
            times["time/weight_sync"] = self.engine.sync(policy, self.state.step)
        seeds = step_seeds(self.seed, self.state.step, len(idx), self.rank, self.world)
        started = time.perf_counter()
        with self.accelerator.autocast():  # sampling at the run's precision (bf16 halves it on a CPU with AVX512-BF16)
            batch = ro.rollout(policy, self.m.tokenizer, rows, [self.prompt_ids[i] for i in idx], cfg,
                               synced_gpus=self.sharded, engine=self.engine, seeds=seeds)
        times["time/generation"] = time.perf_counter() - started
        started = time.perf_counter()
        with torch.no_grad(), self.accelerator.autocast():  # no_grad, not inference_mode (FSDP2)
            old_logprobs = ro.logprobs(policy, batch, cfg)
            unwrapped = self.accelerator.unwrap_model(self.m.policy)
            ref_logprobs = ro.reference_logprobs(unwrapped, self.m.reference, batch, cfg)
            values = self._per_row(self.m.critic, batch)
            batch.scores = ro.score(self.m.reward, self.m.tokenizer, batch, cfg, self.m.reward_tokenizer)
        times["time/scoring"] = time.perf_counter() - started
        self._attach_advantages(batch, old_logprobs, ref_logprobs, values)
        return batch, times

    def _attach_advantages(self, batch: ro.Rollout, old_logprobs, ref_logprobs, values) -> None:
        cfg, mask = self.cfg, batch.response_mask.float()
        kl = losses.kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
        scores = batch.scores.float()
        everyone = self._all(scores)  # normalise with the global batch's statistics, as one process would
        if cfg.reward_normalization and everyone.numel() > 1:
            scores = (scores - everyone.mean()) / (everyone.std() + 1e-6)
        rewards = adv.kl_penalty_rewards(kl, scores, mask, self.kl_ctl.value)
        if cfg.whiten_rewards:
            rewards = adv.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = adv.gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
        batch.experience = ro.Experience(old_logprobs=old_logprobs.clone(), values=(values * mask).clone(),
                                         advantages=adv.masked_whiten(advantages, mask), returns=returns, kl=kl,
                                         rewards=rewards)

    # ---------------------------------------------------------------------------------------------- update

    def _policy_loss(self, part: ro.Rollout, count: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This piece's share of the clipped surrogate minus the entropy bonus (means over `count` tokens). The
        entropy is only logged, without its graph, at `entropy_coef` 0."""
        cfg, mask, ex = self.cfg, part.response_mask.float(), part.experience
        logprobs, entropy = ro.policy_forward(self.m.policy, part, cfg.temperature, with_entropy=True,
                                              entropy_grad=cfg.entropy_coef > 0)
        weights = None
        if cfg.rollout.importance_correction and part.sampler_logprobs is not None:
            weights = losses.truncated_importance_weights(ex.old_logprobs, part.sampler_logprobs,
                                                          cfg.rollout.importance_cap)
        pg_loss, clip_frac, approx_kl = losses.policy_loss(logprobs, ex.old_logprobs, ex.advantages, mask,
                                                           cfg.clip_range, count, weights)
        mean_entropy = adv.masked_mean(entropy, mask, count=count)
        stats = {"loss/policy": pg_loss.detach(), "policy/clipfrac": clip_frac, "policy/approx_kl": approx_kl,
                 "policy/entropy": mean_entropy.detach()}
        return pg_loss - cfg.entropy_coef * mean_entropy, stats

    def _value_loss(self, part: ro.Rollout, count: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This piece's share of `vf_coef` times the clipped value loss (means over `count` tokens)."""
        cfg, mask, ex = self.cfg, part.response_mask.float(), part.experience
        vf_loss, vf_clip = losses.value_loss(self.m.critic(part), ex.values, ex.returns, mask,
                                             cfg.clip_range_value, count)
        return cfg.vf_coef * vf_loss, {"loss/value": vf_loss.detach(), "value/clipfrac": vf_clip}

    def _pieces(self, mb: ro.Rollout) -> list[ro.Rollout]:
        """Forward/backward pieces of a (micro-)minibatch: in one process, length-grouped micro-batches of
        `forward_batch_size` episodes trimmed of their padding; under DDP or FSDP the whole of it (one forward and
        backward per optimiser micro-step, as their gradient hooks expect)."""
        if self.world > 1:
            return [ro.trim_left_padding(mb)]
        return [part for _, part in ro.micro_batches(mb, self.cfg.forward_batch_size)]

    def _backward(self, mb: ro.Rollout, scale: float) -> dict[str, torch.Tensor]:
        """Gradients of (policy loss + value loss) of one (micro-)minibatch, times `scale` (its share of the
        minibatch), accumulated piece by piece.

        Every loss term is a per-token mean, so each piece contributes its tokens' sum over the whole count and the
        accumulated gradient and statistics are the minibatch's; only one piece's activations are alive at a time.
        A separate critic shares no weights with the policy, so the policy's backward runs before the critic's
        forward; a value head shares the policy's trunk: one backward of the sum."""
        acc = self.accelerator
        count = mb.response_mask.float().sum().clamp(min=1)
        joint = isinstance(acc.unwrap_model(self.m.critic), ValueHead)
        totals: dict[str, torch.Tensor] = {}
        for part in self._pieces(mb):
            with acc.autocast():
                policy_loss, stats = self._policy_loss(part, count)
            if not joint:
                check_finite(policy_loss, self.state.step)
                acc.backward(policy_loss * scale)
            with acc.autocast():
                value_loss, value_stats = self._value_loss(part, count)
            loss = policy_loss + value_loss if joint else value_loss
            check_finite(loss, self.state.step)
            acc.backward(loss * scale)
            for key, value in {**stats, **value_stats}.items():
                totals[key] = totals[key] + value if key in totals else value
        return totals

    def update(self, batch: ro.Rollout) -> dict[str, float]:
        """`ppo_epochs` passes of shuffled minibatches; each minibatch is split into `grad_accum` micro-batches."""
        cfg = self.cfg
        self.m.policy.train()
        self.m.critic.train()
        size = len(batch.texts)
        mini = min(max(1, cfg.mini_batch_size // self.world), size)  # this rank's share of a global minibatch
        micro = max(1, mini // cfg.train.grad_accum)
        collected: list[dict[str, torch.Tensor]] = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(size).tolist()
            for start in range(0, size, mini):
                chunk = order[start:start + mini]
                for micro_start in range(0, len(chunk), micro):
                    part = chunk[micro_start:micro_start + micro]
                    collected.append(self._backward(ro.select(batch, part), len(part) / len(chunk)))
                self._step_optimizers()
        return {k: torch.stack([s[k] for s in collected]).mean().item() for k in collected[0]}

    def _step_optimizers(self) -> None:
        acc, max_norm = self.accelerator, self.cfg.train.max_grad_norm
        for model, opt in ((self.m.policy, self.policy_opt), (self.m.critic, self.critic_opt)):
            params = [p for p in model.parameters() if p.requires_grad]
            if params:
                acc.clip_grad_norm_(params, max_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------------ loop

    def step(self) -> dict[str, float]:
        batch, times = self.collect()
        started = time.perf_counter()
        stats = self.update(batch)
        times["time/update"] = time.perf_counter() - started
        if batch.sampler_logprobs is not None:  # how far the sampling engine's numbers are from the trainer's
            gap_mean, gap_max = losses.logprob_mismatch(batch.experience.old_logprobs, batch.sampler_logprobs,
                                                        batch.response_mask.float())
            stats.update({"rollout/logprob_diff_mean": gap_mean, "rollout/logprob_diff_max": gap_max})
        stats = self._mean_over_ranks(stats)
        kl_per_episode = self._all(batch.experience.kl.sum(1))
        kl_seq = kl_per_episode.mean().item()  # the same on every rank, so the adaptive KL coefficient stays in step
        self.kl_ctl.update(kl_seq, kl_per_episode.numel())
        stats.update(step_stats(self._all(batch.scores.float()), self._all(batch.response_mask.float().sum(1)),
                                self._all(batch.has_eos.float()), kl_seq, self.kl_ctl.value))
        stats.update(times)
        return stats

    def train(self, hooks=None) -> list[dict[str, Any]]:
        """Run (or resume) to `total_steps`; returns the per-step log history. `hooks` (a `pipeline.course.Hooks`,
        given by the stage's course): its progress display with the kind's figures, and `hooks.checkpoint(step)`
        once every rank is past a checkpoint (the attempt log; crash tests kill the process there). None (benches,
        tests): no display, nothing called at checkpoints."""
        if not self.checkpoint_checked:
            self.load_checkpoint()
        display = (hooks.progress(self.total_steps, self.state.step, self.cfg.rollout_batch_size) if hooks is not None
                   else Console.silent().progress(self.total_steps, "ppo", self.state.step))
        self._start_trackers()
        try:
            while self.state.step < self.total_steps:
                stats = self.step()
                self.state.step += 1
                entry = {"step": self.state.step, "episodes": self.state.step * self.cfg.rollout_batch_size,
                         **{k: round(v, 6) for k, v in stats.items()}}
                self.state.log_history.append(entry)
                self._log(entry)
                display.update(self.state.step, hooks.figures(stats) if hooks is not None else {})
                if self.work_dir is not None and self.state.step % self.cfg.train.save_steps == 0 \
                        and self.state.step < self.total_steps:
                    self.save_checkpoint()
                    if hooks is not None:
                        self.accelerator.wait_for_everyone()
                        hooks.checkpoint(self.state.step)
        finally:
            display.close()
            self._finish_trackers()
        return self.state.log_history

    # ---------------------------------------------------------------------------------------------- trackers

    def _start_trackers(self) -> None:
        """Open the trackers' runs and give them the config (Accelerate: on the main process)."""
        if self.accelerator.log_with:
            self.accelerator.init_trackers("ppo", config=self.tracker_config)  # named by the tracker objects

    def _log(self, entry: dict[str, Any]) -> None:
        """One step's log entry to the trackers, as `train/<key>` at step `entry['step']` (the trainers' axis)."""
        if self.accelerator.trackers:
            self.accelerator.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=entry["step"])

    def _finish_trackers(self) -> None:
        """Close the runs (not `end_training()`: that would also end the process group the next stages use)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()

    # ----------------------------------------------------------------------------------------- checkpoints

    def _checkpoint_path(self) -> Path | None:
        return None if self.work_dir is None else Path(self.work_dir) / CHECKPOINT

    def save_checkpoint(self) -> None:
        """Policy (trainable weights), critic, optimisers, RNG, step, KL controller, data order, history. Every rank
        calls it: under FSDP the whole states are gathered collectively; the main process writes the file."""
        path = self._checkpoint_path()
        if path is None:
            return
        policy, policy_opt = self._full_state(self.m.policy, self.policy_opt, trainable_only=True)
        critic, critic_opt = self._full_state(self.m.critic, self.critic_opt)
        if not self.accelerator.is_main_process:
            return
        state = {"step": self.state.step, "log_history": self.state.log_history, "before": self.state.before,
                 "policy": policy, "critic": critic, "policy_opt": policy_opt, "critic_opt": critic_opt,
                 "kl_ctl": self.kl_ctl.state_dict(), "order": self.order, "order_gen": self.order_gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def _state_options(self, **extra):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=self.sharded, **extra)

    def _full_state(self, model, optimizer, trainable_only: bool = False) -> tuple[dict, dict]:
        """Whole model and optimiser states keyed by parameter name (the same format with one process, DDP or
        FSDP, so a run resumes under another launch); a collective under FSDP, empty on ranks other than 0."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        weights, moments = get_state_dict(model, optimizer, options=self._state_options())
        if trainable_only:
            names = {n for n, p in self.accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
            weights = {k: v for k, v in weights.items() if k in names}
        return weights, moments

    def load_checkpoint(self) -> bool:
        """Resume from the work folder's checkpoint if there is one; True if it did. Every rank calls it, before
        any forward pass: FSDP2 leaves the root's parameters unsharded after a forward without backward
        (generation, scoring), and the optimiser states can only be matched to sharded parameters."""
        self.checkpoint_checked = True
        resumed = self._load_states()
        self._init_sharded_root()
        return resumed

    def _init_sharded_root(self) -> None:
        """Under FSDP2, run one forward through the policy's root first: generation enters a LoRA policy below
        its root (PeftModel -> base model), and FSDP2 must have found its root before any wrapped module runs."""
        if self.sharded:
            with torch.no_grad():
                self.m.policy(input_ids=torch.tensor([[self.m.tokenizer.pad_token_id]], device=self.accelerator.device))

    def _load_states(self) -> bool:
        """Each rank reads the whole states from the (shared) file and keeps its own shard of them under FSDP."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = self._checkpoint_path()
        if path is None or not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        options = self._state_options(strict=False)
        for model, optimizer, key in ((self.m.policy, self.policy_opt, "policy"),
                                      (self.m.critic, self.critic_opt, "critic")):
            set_state_dict(model, optimizer, model_state_dict=state[key], optim_state_dict=state[f"{key}_opt"],
                           options=options)
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.order, self.state.step = list(state["order"]), int(state["step"])
        self.state.log_history = list(state["log_history"])
        self.state.before = state.get("before")
        self.order_gen.set_state(state["order_gen"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        log.info("ppo: resumed from %s at step %d", path, self.state.step)
        return True


def step_stats(scores: torch.Tensor, lengths: torch.Tensor, ended: torch.Tensor, kl_seq: float,
               kl_coef: float) -> dict[str, float]:
    """Per-step log entries over the global batch (scores, response lengths and EOS flags of every episode)."""
    return {"reward/mean": scores.mean().item(), "reward/std": scores.std().item() if scores.numel() > 1 else 0.0,
            "kl": kl_seq, "kl_coef": kl_coef, "response_length": lengths.mean().item(),
            "eos_fraction": ended.mean().item()}


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not math.isfinite(loss.item()):
        raise TrainingError(f"PPO loss became {loss.item()} at step {step}", key="train.learning_rate",
                            fix="lower the learning rate or kl_coef, or check the reward model's scores")


def reference_copy(policy):
    """A frozen deep copy of the starting policy (full fine-tuning's reference)."""
    ref = copy.deepcopy(policy)
    return ref.requires_grad_(False).eval()

