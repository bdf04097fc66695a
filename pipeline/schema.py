"""The recipe schema, in one place: shared sections (model, LoRA, data, training) and each stage kind's own fields.

Every model here is strict (unknown keys are errors). A stage config composes the shared sections it needs and adds
only its own fields. `pipeline.recipe` loads YAML into these models; `pipeline.registry` maps a stage `kind` to its
config class and its run module. Nothing runs at import; no heavy library is imported here.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REF_PATTERN = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_\-]*)\}$")
STAGE_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")

Tracker = Literal["none", "tensorboard", "trackio", "wandb", "mlflow"]
REPORT_TO_HELP = ("experiment trackers that receive the training curves, the run name and the resolved config: "
                  "none, tensorboard, trackio, wandb, mlflow, or a list (see docs/tracking.md)")

# What a stage's artifact is; a reference is accepted where the consuming key lists the producer's kind.
TOKENIZER, CAUSAL_LM, REWARD_MODEL, REPORT, GGUF = "tokenizer", "causal-lm", "reward-model", "report", "gguf"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())


def _path_shorthand(value: Any) -> Any:
    """`model: ${sft}` or `model: org/name` is short for `model: {path: ...}`."""
    return {"path": value} if isinstance(value, str) else value


class ModelSection(Strict):
    """Which model a stage starts from: an artifact reference, a local folder or a Hub id; or a config to build."""

    path: str | None = None
    architecture: Literal["llama", "qwen2", "mistral", "gpt2"] = "llama"
    config: dict[str, Any] | None = Field(default=None, description="architecture config to initialise from scratch")
    gguf_file: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is None and self.config is None:
            raise ValueError("set `path` (artifact reference, folder or Hub id) or `config` (to build from scratch)")
        return self


class LoraSection(Strict):
    """LoRA adapter settings (peft). `merge: true` writes a merged full model instead of an adapter."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge: bool = False


class DataSection(Strict):
    """A dataset: local file (json/jsonl/csv/parquet/txt, optionally .gz) or Hub id, with field mapping and splits."""

    path: str = Field(description="local file or Hub dataset id")
    name: str | None = Field(default=None, description="Hub dataset config name")
    split: str = Field("train", description="Hub split to train on")
    eval_path: str | None = Field(default=None, description="held-out rows from another file or Hub id")
    eval_split: str | None = Field(default=None, description="held-out rows from another split of `path`")
    eval_fraction: float | None = Field(default=None, gt=0, lt=1, description=(
        "hold this fraction of the rows of `path` (rounded up) out of training for evaluation, as `eval_rows` does"))
    eval_rows: int | None = Field(default=None, gt=0, description=(
        "hold this many rows of `path` out of training for evaluation, drawn by the stage seed from the rows as read "
        "(stages reading the same file with the same seed hold out the same rows); the manifest's `held_out` lists "
        "them"))
    fields: dict[str, str] = Field(default_factory=dict, description="canonical field -> column in the file")
    max_rows: int | None = Field(default=None, gt=0, description=(
        "train on at most this many usable rows (the first ones, held-out rows left out)"))
    max_eval_rows: int | None = Field(default=None, gt=0, description=(
        "evaluate on at most this many usable held-out rows (the first ones)"))
    on_bad_rows: Literal["error", "skip"] = Field("error", description=(
        "a bad row (empty, missing field, wrong type, over-long) stops the run, or is skipped with a warning"))
    train_on: Literal["last_turn", "all_turns"] = Field("last_turn", description=(
        "sft: the loss is on each conversation's last assistant turn, or on every assistant turn (one "
        "prompt/completion row per turn, with the conversation before it as the prompt)"))

    @field_validator("path")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("eval_fraction", "eval_rows")
    @classmethod
    def _one_way_to_hold_out(cls, value, info):
        if value is None:
            return value
        if info.data.get("eval_path") or info.data.get("eval_split"):
            given = "eval_path" if info.data.get("eval_path") else "eval_split"
            raise ValueError(f"`{given}` already gives the held-out rows: drop `{info.field_name}` (or `{given}`)")
        if info.field_name == "eval_rows" and info.data.get("eval_fraction") is not None:
            raise ValueError("set `eval_rows` or `eval_fraction`, not both")
        return value


class TrainSection(Strict):
    """Optimisation settings shared by every trainable stage (mapped onto transformers' TrainingArguments)."""

    learning_rate: float = Field(2e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    batch_size: int = Field(8, gt=0)
    eval_batch_size: int | None = Field(default=None, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(512, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: str = "linear"
    optim: str = "adamw_torch"
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(100, gt=0)
    save_total_limit: int = Field(2, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    use_liger_kernel: bool = False
    packing: bool | None = Field(default=None,
                                 description="null: on for pretrain; for sft only with FlashAttention (padding-free)")
    num_workers: int = Field(0, ge=0)


class HubTarget(Strict):
    """Where to push an artifact: repo id, visibility, branch."""

    repo_id: str
    private: bool = True
    revision: str | None = None
    commit_message: str | None = None

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$", value):
            raise ValueError(f"'{value}' is not a Hub repo id like 'user/name'")
        return value


def _hub_shorthand(value: Any) -> Any:
    return {"repo_id": value} if isinstance(value, str) else value


class StageBase(Strict):
    """Fields every stage has. `produces` says what its artifact is; `references` which keys may hold `${stage}`."""

    produces: ClassVar[str] = CAUSAL_LM
    references: ClassVar[dict[str, tuple[str, ...]]] = {}

    kind: str
    description: str | None = None
    push_to_hub: HubTarget | None = None
    seed: int | None = None
    report_to: Tracker | list[Tracker] | None = Field(
        default=None, description="this stage's trackers (null: the recipe's `report_to`); " + REPORT_TO_HELP)

    _hub = field_validator("push_to_hub", mode="before")(lambda cls, v: _hub_shorthand(v))

    @model_validator(mode="after")
    def _train_on_is_for_sft(self):
        data = getattr(self, "data", None)
        if isinstance(data, DataSection) and data.train_on != "last_turn" and self.kind != "sft":
            raise ValueError(f"`data.train_on: {data.train_on}` applies to sft stages only: remove it")
        return self

    def produced_kind(self) -> str:
        return self.produces


class ModelStage(StageBase):
    """A stage that starts from a model: `model:` (reference, folder, Hub id or a config to build)."""

    model: ModelSection

    _model = field_validator("model", mode="before")(lambda cls, v: _path_shorthand(v))


class TrainedStage(ModelStage):
    """A stage that trains its model on a dataset, optionally through a LoRA adapter."""

    lora: LoraSection | None = None
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)


_ANY_MODEL = (CAUSAL_LM,)


class TokenizerStage(StageBase):
    """Train a byte-level BPE tokenizer with a chat template."""

    produces: ClassVar[str] = TOKENIZER
    kind: Literal["tokenizer"]
    data: DataSection
    vocab_size: int = Field(8000, ge=300)
    min_frequency: int = Field(2, ge=1)
    text_fields: list[str] = Field(default_factory=lambda: ["text"])
    chat_template: str = "chatml"
    model_max_length: int = Field(2048, gt=0)


class PretrainStage(ModelStage):
    """Causal LM from a config (Llama by default) or continued pretraining; packing on."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"tokenizer": (TOKENIZER, CAUSAL_LM), "model.path": _ANY_MODEL}
    kind: Literal["pretrain"]
    tokenizer: str | None = None
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    text_field: str = "text"

    @model_validator(mode="after")
    def _tokenizer_for_scratch(self):
        if self.model.config is not None and self.model.path is None and not self.tokenizer:
            raise ValueError("a model built from `config` needs `tokenizer:` (e.g. ${tokenizer} or a folder)")
        return self


class SftStage(TrainedStage):
    """Supervised fine-tuning, full or LoRA, on messages or prompt/completion data; loss on completions."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL, "tokenizer": (TOKENIZER, CAUSAL_LM)}
    kind: Literal["sft"]
    tokenizer: str | None = None
    completion_only_loss: bool = True


class RewardStage(TrainedStage):
    """Sequence-classification reward model on chosen/rejected pairs."""

    produces: ClassVar[str] = REWARD_MODEL
    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": (CAUSAL_LM, REWARD_MODEL),
                                                        "tokenizer": (TOKENIZER, CAUSAL_LM)}
    kind: Literal["reward"]
    tokenizer: str | None = None
    center_rewards_coefficient: float | None = None


class DpoStage(TrainedStage):
    """Direct preference optimisation (TRL DPOTrainer); reference = the input model or the base under LoRA."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL}
    kind: Literal["dpo"]
    beta: float = Field(0.1, gt=0)
    loss_type: str = "sigmoid"
    precompute_ref_log_probs: bool = False


class KtoStage(TrainedStage):
    """KTO (TRL KTOTrainer) on unpaired or paired preference data."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL}
    kind: Literal["kto"]
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _kl_batch(self):
        if self.loss_type == "kto" and self.train.batch_size < 2:
            raise ValueError("KTO estimates its KL term within a batch: set train.batch_size >= 2")
        return self


class MergeStage(ModelStage):
    """Merge a LoRA adapter artifact into its base, writing a full model."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL}
    kind: Literal["merge"]


class ExportStage(ModelStage):
    """GGUF file for llama.cpp and Ollama, plus a Modelfile, from a causal LM (an adapter is merged first)."""

    produces: ClassVar[str] = GGUF
    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL}
    kind: Literal["export"]
    format: Literal["gguf"] = Field("gguf", description="file format: GGUF, which llama.cpp and Ollama run")
    quant: Literal["f16", "q8_0", "q4_k_m"] = Field(
        "q8_0", description="f16: 16-bit floats; q8_0: 8-bit (about half the size, nearly lossless); q4_k_m: llama.cpp "
                            "4-bit k-quant (about a quarter; tensors whose rows are not a multiple of 256 fall back "
                            "to other types)")
    tokenizer_pre: str | None = Field(
        default=None, description="llama.cpp pre-tokenizer name written as tokenizer.ggml.pre (e.g. gpt-2, llama3, "
                                  "qwen2); null: the converter's own detection, and for a tokenizer it does not know, "
                                  "GPT-2 byte-level read from tokenizer.json or the base GGUF's own")


class RuleReward(Strict):
    """A rule-based reward computed from the data: exact match on a known answer, or a length penalty."""

    type: Literal["exact_match", "contains_answer", "length_penalty"]
    field: str = "answer"
    weight: float = 1.0
    target_length: int | None = None


class PpoStage(TrainedStage):
    """Our PPO on Accelerate: policy (+value head or critic), frozen reference, learned reward model."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL, "reward_model": (REWARD_MODEL,),
                                                        "value_model": (REWARD_MODEL,)}
    kind: Literal["ppo"]
    reward_model: str
    value_model: str | None = Field(default=None, description="critic init; default: the reward model")
    value_head: bool = Field(False, description="a linear value head on the policy instead of a critic")
    value_lora: bool = Field(False, description="train the critic as LoRA adapters (the stage's `lora:` settings, or "
                                                "their defaults) and its score head instead of all its weights: "
                                                "no optimiser state for its backbone (~1 GB less at 135M)")
    rewards: list[RuleReward] = Field(default_factory=list)
    total_episodes: int = Field(256, gt=0)
    rollout_batch_size: int = Field(16, gt=0)
    mini_batch_size: int = Field(8, gt=0)
    ppo_epochs: int = Field(2, gt=0)
    forward_batch_size: int = Field(8, gt=0, description="episodes per forward pass, grouped by prompt length: "
                                    "the no-grad scoring passes (old and reference log-probs, values, reward "
                                    "scores) and, in one process, the update's forward/backward pieces (gradients "
                                    "accumulate to the minibatch's); smaller: less memory and padding (1-2 is "
                                    "fastest on CPU at a real vocabulary), larger: fewer calls (tiny models, GPUs)")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    kl_coef: float = Field(0.05, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive_kl: bool = False
    target_kl: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, gt=0)
    whiten_rewards: bool = False
    reward_normalization: bool = True
    missing_eos_penalty: float | None = 1.0
    stop_strings: list[str] = Field(default_factory=list)
    entropy_coef: float = Field(0.0, ge=0)
    value_learning_rate: float | None = Field(default=None, gt=0)
    eval_prompts: int = Field(64, gt=0)
    eval_samples: int = Field(4, gt=0, description="answers sampled per held-out prompt for the sampled reward, "
                                                   "exact match and KL, before and after training")

    @model_validator(mode="after")
    def _one_kind_of_critic(self):
        if self.value_head and self.value_lora:
            raise ValueError("`value_lora: true` adapts a separate critic, `value_head: true` has none: set one of them")
        return self


class OnlineRLStage(TrainedStage):
    """Fields shared by TRL's online trainers (GRPO, RLOO)."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL, "reward_model": (REWARD_MODEL,)}
    reward_model: str | None = None
    rewards: list[RuleReward] = Field(default_factory=list)
    num_generations: int = Field(4, ge=2)
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.04, ge=0)
    eval_prompts: int = Field(64, gt=0)
    eval_samples: int = Field(4, gt=0, description="answers sampled per held-out prompt for the sampled reward and "
                                                   "exact match, before and after training")

    @model_validator(mode="after")
    def _some_reward(self):
        if not self.reward_model and not self.rewards:
            raise ValueError("set `reward_model:` (e.g. ${reward}) or at least one rule in `rewards:`")
        return self


class GrpoStage(OnlineRLStage):
    """Group-relative policy optimisation (TRL GRPOTrainer)."""

    kind: Literal["grpo"]


class RlooStage(OnlineRLStage):
    """REINFORCE leave-one-out (TRL RLOOTrainer)."""

    kind: Literal["rloo"]


class EvalSection(Strict):
    """One evaluation: which metric, on which data."""

    metric: Literal["perplexity", "pairwise_accuracy", "win_rate", "exact_match", "lm_eval"]
    data: DataSection | None = None
    reward_model: str | None = None
    reference: str | None = None
    tasks: list[str] = Field(default_factory=list)
    include_path: str | None = None
    limit: int | None = Field(default=None, gt=0)
    max_new_tokens: int = Field(32, gt=0)


class EvaluateStage(ModelStage):
    """Evaluate an artifact; results go to its own report artifact and into the evaluated model's card."""

    produces: ClassVar[str] = REPORT
    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": (CAUSAL_LM, REWARD_MODEL),
                                                        "evals.reward_model": (REWARD_MODEL,),
                                                        "evals.reference": (CAUSAL_LM,)}
    kind: Literal["evaluate"]
    evals: list[EvalSection] = Field(min_length=1)
    batch_size: int = Field(16, gt=0)


class ParallelismSection(Strict):
    """Accelerate ParallelismConfig sizes; -1 on dp_shard means 'the rest'."""

    dp_replicate: int = Field(1, ge=1)
    dp_shard: int = Field(1, ge=-1)
    tp: int = Field(1, ge=1)
    cp: int = Field(1, ge=1)


class Defaults(Strict):
    """Sections merged into every stage that has them; a stage's own values win."""

    train: dict[str, Any] = Field(default_factory=dict)
    lora: dict[str, Any] | None = None


class RecipeHeader(Strict):
    """Recipe-level fields; `stages` is validated per stage kind by `pipeline.recipe`."""

    name: str
    description: str | None = None
    output_dir: str | None = None
    seed: int = 42
    license: str = "apache-2.0"
    defaults: Defaults = Field(default_factory=Defaults)
    push_to_hub: HubTarget | None = None
    parallelism: ParallelismSection | None = None
    report_to: Tracker | list[Tracker] = Field(default="none", description="every stage's trackers unless the "
                                               "stage sets its own; " + REPORT_TO_HELP)
    stages: dict[str, dict[str, Any]]

    _hub = field_validator("push_to_hub", mode="before")(lambda cls, v: _hub_shorthand(v))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not STAGE_NAME_PATTERN.match(value):
            raise ValueError("use letters, digits, '_' and '-' only")
        return value

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("a recipe needs at least one stage")
        for name in value:
            if not STAGE_NAME_PATTERN.match(str(name)):
                raise ValueError(f"stage name '{name}' must use letters, digits, '_' and '-' only")
        return value
