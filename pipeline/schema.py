"""The recipe schema, in one place: shared sections (model, LoRA, data, training) and each stage kind's own fields.

Every model here is strict (unknown keys are errors). A stage config composes the shared sections it needs and adds
only its own fields. `pipeline.recipe` loads YAML into these models; `pipeline.registry` maps a stage `kind` to its
config class and its run module. Nothing runs at import; no heavy library is imported here.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from pipeline import chat_templates, names

REF_PATTERN = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_\-]*)\}$")
STAGE_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")

Tracker = Literal["none", "tensorboard", "trackio", "wandb", "mlflow"]
REPORT_TO_HELP = ("experiment trackers that receive the training curves, the run name and the resolved config: "
                  "none, tensorboard, trackio, wandb, mlflow, or a list (see docs/tracking.md)")

# What a stage's artifact is; a reference is accepted where the consuming key lists the producer's kind.
TOKENIZER, CAUSAL_LM, REWARD_MODEL, REPORT, GGUF = "tokenizer", "causal-lm", "reward-model", "report", "gguf"


def _registered(value: str, names, what: str) -> str:
    """`value` when it names an entry of a registry, else a one-line error with the choices."""
    if value not in names:
        raise ValueError(f"unknown {what} '{value}': choose from {', '.join(names)}")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())


def _path_shorthand(value: Any) -> Any:
    """`model: ${sft}` or `model: org/name` is short for `model: {path: ...}`."""
    return {"path": value} if isinstance(value, str) else value


class ModelSection(Strict):
    """Which model a stage starts from: an artifact reference, a local folder or a Hub id; or a config to build."""

    path: str | None = Field(None, description=(
        "artifact reference (`${stage}`), local folder or Hub id to start from; an adapter is loaded on its "
        "base"))
    architecture: Literal["llama", "qwen2", "mistral", "gpt2"] = Field("llama", description=(
        "model family built from `config` (ignored when `path` is set)"))
    config: dict[str, Any] | None = Field(default=None, description="architecture config to initialise from scratch")
    gguf_file: str | None = Field(None, description="load this .gguf file from `path` (dequantised by transformers)")
    revision: str | None = Field(None, description="Hub branch, tag or commit of `path`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "weights' dtype; auto: bfloat16 where a CUDA device supports it, else float32"))
    attn_implementation: str | None = Field(None, description=(
        "transformers attention kernel, e.g. sdpa, eager or flash_attention_2 (null: the default)"))
    trust_remote_code: bool = Field(False, description=(
        "run Python code shipped with the model repository (off: refused)"))

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is None and self.config is None:
            raise ValueError("set `path` (artifact reference, folder or Hub id) or `config` (to build from scratch)")
        return self


class LoraSection(Strict):
    """LoRA adapter settings (peft). `merge: true` writes a merged full model instead of an adapter."""

    r: int = Field(16, gt=0, description="adapter rank")
    alpha: int = Field(32, gt=0, description="scaling numerator (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description=(
        "dropout on the adapter's input (PPO turns dropout off, as TRL's PPOTrainer does: its importance ratio "
        "compares the update's log-probs with the rollout's)"))
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description=(
        "module names to adapt (e.g. [q_proj, v_proj]) or every linear layer"))
    merge: bool = Field(False, description=(
        "save the base with the adapter merged in (full weights) instead of the adapter"))
    quantize: Literal["4bit", "8bit"] | None = Field(None, exclude_if=lambda value: value is None, description=(
        "QLoRA: load the base through bitsandbytes, 4bit (NF4, double quantisation, bf16 compute) or 8bit "
        "(LLM.int8), and train the adapter on it; needs a CUDA GPU and the bitsandbytes package; sft, dpo, ipo, "
        "cpo, simpo, orpo and kto stages; with `merge: true` the adapter is merged into the base reloaded "
        "unquantized (null: the base in `model.dtype`; left out of the fingerprint when null)"))


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
    skip_rows: int | None = Field(default=None, gt=0, exclude_if=lambda value: value is None, description=(
        "sft, reward and the pair kinds: leave out the first N training rows in the order the trainer reads them "
        "(with `train.group_by_length` its seeded length-grouped order, else the file's; after `max_rows`). A stage "
        "with the same data, tokenizer, `train` and seed that trains max_steps x batch_size x grad_accum = N rows "
        "read exactly those, so this one trains on the rows after them (left out of the fingerprint when null)"))
    max_eval_rows: int | None = Field(default=None, gt=0, description=(
        "evaluate on at most this many usable held-out rows (the first ones)"))
    on_bad_rows: Literal["error", "skip"] = Field("error", description=(
        "a bad row (empty, missing field, wrong type, over-long) stops the run, or is skipped with a warning"))
    train_on: Literal["last_turn", "all_turns"] = Field("last_turn", description=(
        "sft: the loss is on each conversation's last assistant turn, or on every assistant turn (one "
        "prompt/completion row per turn, with the conversation before it as the prompt)"))
    format: str | None = Field(default=None, exclude_if=lambda value: value is None, description=(
        "how the file lays its rows out: " + ", ".join(names.DATA_FORMATS) + " (null: detected from the columns of "
        "the first rows; the table in docs/recipes.md#data says which stage kinds read which; left out of the "
        "fingerprint when null)"))
    _hold_out_seed: int = PrivateAttr(default=0)  # not recipe data: the seed evaluations draw `eval_rows` with

    def seeded(self, seed: int) -> "DataSection":
        """This section for an evaluation of a stage run with `seed`: the rows `eval_rows`/`eval_fraction` hold out
        are drawn by that seed, so the evaluation reads exactly the rows the stage held out of training."""
        copy = self.model_copy()
        copy._hold_out_seed = seed
        return copy

    @property
    def hold_out_seed(self) -> int:
        return self._hold_out_seed

    @field_validator("path")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        return value if value is None else _registered(value, names.DATA_FORMATS, "data format")

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

    learning_rate: float = Field(2e-5, gt=0, description="peak learning rate (the policy's, for PPO)")
    epochs: float = Field(1.0, gt=0, description="passes over the training rows (ignored when `max_steps` > 0)")
    max_steps: int = Field(-1, ge=-1, description="optimizer steps to run; -1: as many as `epochs` give")
    batch_size: int = Field(8, gt=0, description="rows per device per step (GRPO/RLOO: completions)")
    eval_batch_size: int | None = Field(default=None, gt=0, description=(
        "rows per device in the trainer's evaluation (null: `batch_size`)"))
    grad_accum: int = Field(1, gt=0, description="micro-batches accumulated per optimizer step (PPO: per minibatch)")
    max_length: int = Field(512, gt=0, description=(
        "tokens per training sequence; longer sft and preference rows, and PPO prompts longer than max_length "
        "minus max_new_tokens, are bad rows (`data.on_bad_rows`)"))
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="linear warm-up over this fraction of the steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    lr_scheduler: str = Field("linear", description="transformers scheduler name: linear, cosine, constant, ...")
    optim: str = Field("adamw_torch", description="transformers optimizer name")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    logging_steps: int = Field(10, gt=0, description=(
        "log loss, learning rate and grad norm every N steps (not part of the fingerprint)"))
    save_steps: int = Field(100, gt=0, description=(
        "checkpoint every N steps, for resuming a killed run (not part of the fingerprint)"))
    save_total_limit: int = Field(2, gt=0, description=(
        "checkpoints kept in the work folder (not part of the fingerprint)"))
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description=(
        "auto: bf16 on a CUDA device that supports it, else full precision"))
    gradient_checkpointing: bool = Field(False, description=(
        "recompute activations in the backward pass (less memory, slower)"))
    use_liger_kernel: bool = Field(False, description="Liger fused kernels (needs the liger-kernel package)")
    packing: bool | None = Field(default=None,
                                 description="null: on for pretrain; for sft only with FlashAttention (padding-free)")
    group_by_length: bool = Field(False, description=(
        "sft, reward, dpo, ipo, cpo, simpo, orpo: batch rows of similar token length together (less padding); rows "
        "are shuffled, sorted by length within groups of 50 batches, and the batches shuffled, all by the seed"))
    num_workers: int = Field(0, ge=0, description="data loader worker processes (not part of the fingerprint)")


class HubTarget(Strict):
    """Where to push an artifact: repo id, visibility, branch."""

    repo_id: str = Field(description="Hub model repo, 'user/name' or 'org/name'")
    private: bool = Field(True, description="create the repo private")
    revision: str | None = Field(None, description="branch to push to (a recipe-level target: the stage's name)")
    commit_message: str | None = Field(None, description="the Hub commit's message (null: one naming the stage)")

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

    kind: str = Field(description="which stage this is (the headings below)")
    description: str | None = Field(None, description="free text for people (not part of the fingerprint)")
    push_to_hub: HubTarget | None = Field(None, description=(
        "push the artifact after the stage (a repo id, or {repo_id, private, revision})"))
    seed: int | None = Field(None, description="this stage's seed (null: the recipe's `seed`)")
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

    model: ModelSection = Field(description=(
        "the model to start from: `{path: ...}` or just a reference, folder or Hub id"))

    _model = field_validator("model", mode="before")(lambda cls, v: _path_shorthand(v))


class TrainedStage(ModelStage):
    """A stage that trains its model on a dataset, optionally through a LoRA adapter."""

    lora: LoraSection | None = Field(None, description=(
        "train a LoRA adapter instead of the full weights (null: full fine-tuning)"))
    data: DataSection = Field(description="the training rows and their held-out rows")
    train: TrainSection = Field(default_factory=TrainSection, description="optimisation settings")
    chat_template: str | None = Field(None, exclude_if=lambda value: value is None, description=(
        "replace the tokenizer's chat template (saved with the artifact): `chatml`, `chatml-tools` (ChatML that "
        "renders tool schemas, calls and results; needed for `tools:` on a ChatML model such as SmolLM2), a .jinja "
        "file or inline Jinja (null: the tokenizer's own)"))

    @field_validator("chat_template")
    @classmethod
    def _template_form(cls, value):
        known = chat_templates.TEMPLATES
        if value is not None and not (value in known or value.endswith(".jinja")
                                      or chat_templates.looks_like_jinja(value)):
            raise ValueError(f"unknown chat template '{value}': use {', '.join(known)}, a .jinja file or an inline "
                             "Jinja template")
        return value


_ANY_MODEL = (CAUSAL_LM,)


class TokenizerStage(StageBase):
    """Train a byte-level BPE tokenizer with a chat template."""

    produces: ClassVar[str] = TOKENIZER
    kind: Literal["tokenizer"] = Field(description="`tokenizer`")
    data: DataSection = Field(description="text to train the tokenizer on")
    vocab_size: int = Field(8000, ge=300, description="vocabulary size, special tokens included")
    min_frequency: int = Field(2, ge=1, description="a merge must occur this often")
    text_fields: list[str] = Field(default_factory=lambda: ["text"], description="columns whose text is used")
    chat_template: str = Field("chatml", description=(
        "`chatml`, `chatml-tools` (ChatML that also renders tools), or a Jinja chat template"))
    model_max_length: int = Field(2048, gt=0, description="the tokenizer's model_max_length")


class PretrainStage(ModelStage):
    """Causal LM from a config (Llama by default) or continued pretraining; packing on."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"tokenizer": (TOKENIZER, CAUSAL_LM), "model.path": _ANY_MODEL}
    kind: Literal["pretrain"] = Field(description="`pretrain`")
    tokenizer: str | None = Field(None, description=(
        "tokenizer artifact or folder (default: the model's); required when building from `config`"))
    data: DataSection = Field(description="text rows (`text_field`); `eval_path` etc. give the held-out text")
    train: TrainSection = Field(default_factory=TrainSection, description=(
        "optimisation settings; `packing` defaults to on"))
    text_field: str = Field("text", description="the column holding each document's text")

    @model_validator(mode="after")
    def _tokenizer_for_scratch(self):
        if self.model.config is not None and self.model.path is None and not self.tokenizer:
            raise ValueError("a model built from `config` needs `tokenizer:` (e.g. ${tokenizer} or a folder)")
        return self


class SftStage(TrainedStage):
    """Supervised fine-tuning, full or LoRA, on messages or prompt/completion data; loss on completions."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL, "tokenizer": (TOKENIZER, CAUSAL_LM)}
    kind: Literal["sft"] = Field(description="`sft`")
    tokenizer: str | None = Field(None, description=(
        "tokenizer artifact or folder (default: the model's); needs a chat template"))
    completion_only_loss: bool = Field(True, description="loss on the completion tokens only (off: on the prompt too)")
    tools: list[str] = Field(default_factory=list, exclude_if=lambda value: not value, description=(
        "tools whose schemas each conversation's prompt shows (the same as a grpo stage with these tools renders), "
        "from `pipeline.rl.tools`: " + ", ".join(names.TOOLS) + "; tool calls in the data read as <tool_call> blocks"))

    _tools = field_validator("tools")(lambda cls, value: [_registered(v, names.TOOLS, "tool") for v in value])


class RewardStage(TrainedStage):
    """Sequence-classification reward model on chosen/rejected pairs."""

    produces: ClassVar[str] = REWARD_MODEL
    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": (CAUSAL_LM, REWARD_MODEL),
                                                        "tokenizer": (TOKENIZER, CAUSAL_LM)}
    kind: Literal["reward"] = Field(description="`reward`")
    tokenizer: str | None = Field(None, description="tokenizer artifact or folder (default: the model's)")
    center_rewards_coefficient: float | None = Field(None, description=(
        "TRL's penalty pulling the mean reward towards 0 (null: off)"))


class DpoStage(TrainedStage):
    """Direct preference optimisation (TRL DPOTrainer); reference = the input model or the base under LoRA."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL}
    kind: Literal["dpo"] = Field(description="`dpo`")
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference (higher: closer to it)")
    loss_type: str = Field("sigmoid", description=(
        "TRL DPO loss: sigmoid, ipo, hinge, ... (IPO by name: the `ipo` kind; CPO, SimPO, ORPO: their kinds)"))
    precompute_ref_log_probs: bool = Field(False, description=(
        "compute the reference's log-probs once before training (saves memory)"))


class IpoStage(TrainedStage):
    """Identity preference optimisation: TRL DPOTrainer with `loss_type: ipo` (a squared loss pulling each pair's
    log-ratio margin to 1 / (2 beta), which does not saturate); reference as in `dpo`."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL}
    loss_type: ClassVar[str] = "ipo"  # the DPOTrainer loss the `dpo` module runs for this kind
    kind: Literal["ipo"] = Field(description="`ipo`")
    beta: float = Field(0.1, gt=0, description=(
        "IPO's tau: the regularisation towards the reference (the margin target is 1 / (2 beta))"))
    precompute_ref_log_probs: bool = Field(False, description=(
        "compute the reference's log-probs once before training (saves memory)"))


class CpoStage(TrainedStage):
    """Contrastive preference optimisation (TRL's experimental CPOTrainer): no reference model; a preference loss on
    the policy's own log-probs plus a behaviour-cloning (NLL) term on the chosen answers."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL}
    kind: Literal["cpo"] = Field(description="`cpo`")
    beta: float = Field(0.1, gt=0, description="temperature of the preference loss")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = Field("sigmoid", description=(
        "preference loss on the policy's log-prob margin: sigmoid (CPO), hinge (SLiC) or ipo"))
    cpo_alpha: float = Field(1.0, ge=0, description="weight of the NLL term on the chosen answers")


class SimpoStage(TrainedStage):
    """SimPO (TRL's experimental CPOTrainer with `loss_type: simpo` and `cpo_alpha: 0`): no reference model; the
    reward is beta times the length-normalised log-prob, and chosen must beat rejected by `simpo_gamma`."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL}
    kind: Literal["simpo"] = Field(description="`simpo`")
    beta: float = Field(2.0, gt=0, description=(
        "scale of the length-normalised reward (the SimPO paper's 2.0; TRL's own default is 0.1)"))
    simpo_gamma: float = Field(1.0, ge=0, description=(
        "target reward margin (the paper's gamma = beta / 2; TRL's own default is 0.5)"))
    cpo_alpha: float = Field(0.0, ge=0, description="an NLL term on the chosen answers as in `cpo` (0: plain SimPO)")


class OrpoStage(TrainedStage):
    """Odds-ratio preference optimisation (TRL's experimental ORPOTrainer): the SFT loss on the chosen answers plus
    a log odds-ratio loss, in one stage and with no reference model (it can start from a base model)."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL}
    kind: Literal["orpo"] = Field(description="`orpo`")
    beta: float = Field(0.1, gt=0, description=(
        "weight of the odds-ratio loss against the SFT loss (the paper's lambda)"))


class KtoStage(TrainedStage):
    """KTO (TRL KTOTrainer) on unpaired or paired preference data."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL}
    kind: Literal["kto"] = Field(description="`kto`")
    beta: float = Field(0.1, gt=0, description="deviation from the reference")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="kto, or apo_zero_unpaired")
    desirable_weight: float = Field(1.0, gt=0, description="weight of the desirable rows (to balance unequal counts)")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of the undesirable rows")

    @model_validator(mode="after")
    def _kl_batch(self):
        if self.loss_type == "kto" and self.train.batch_size < 2:
            raise ValueError("KTO estimates its KL term within a batch: set train.batch_size >= 2")
        return self


class MergeStage(ModelStage):
    """Merge a LoRA adapter artifact into its base, writing a full model."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL}
    kind: Literal["merge"] = Field(description="`merge`")


class ExportStage(ModelStage):
    """GGUF file for llama.cpp and Ollama, plus a Modelfile, from a causal LM (an adapter is merged first)."""

    produces: ClassVar[str] = GGUF
    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL}
    kind: Literal["export"] = Field(description="`export`")
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
    """A rule-based reward computed from the data: exact match, a length penalty or a verifiable reward."""

    type: str = Field(description=(
        "a rule registered in `pipeline.rl.rewards.RULES`: " + ", ".join(names.REWARD_RULES) + " (exact_match: 1 "
        "when the completion's last number equals the row's `field`; contains_answer: 1 when `field` occurs in it; "
        "length_penalty: -(characters beyond `target_length`) / target_length; math_verify: 1 when the math-verify "
        "package finds the answer equal to `field` (LaTeX, \\boxed{}, numbers; the `rlvr` extra); format: 1 when "
        "the completion is `<think>...</think><answer>...</answer>`; code_tests: 1 when its code passes the asserts "
        "in `tests_field`, run in a sandbox)"))
    field: str = Field("answer", description="the data column holding the answer")
    weight: float = Field(1.0, description="this rule's reward is multiplied by it; the rules are summed")
    target_length: int | None = Field(None, description="length_penalty: characters allowed before the penalty starts")
    extract: Literal["auto", "tagged"] = Field("auto", description=(
        "what exact_match, contains_answer, math_verify and code_tests read: the whole completion (auto; exact_match "
        "takes its last number) or only the content of its last `<tag>...</tag>` (tagged; no tag scores 0)"))
    tag: str = Field("answer", pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$", description=(
        "the answer tag of `extract: tagged` and of the format rule"))
    think_tag: str | None = Field("think", pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$", description=(
        "format: the reasoning tag required before the answer tag (null: the answer tag alone)"))
    timeout: float = Field(5.0, gt=0, description=(
        "math_verify, code_tests: wall-clock seconds allowed per completion; past it the completion scores 0"))
    memory_mb: int = Field(512, ge=64, description="code_tests: address-space limit of the sandboxed code, in MiB")
    tests_field: str = Field("tests", description="code_tests: the data column holding the test asserts")

    _check_registered = field_validator("type")(lambda cls, value: _registered(value, names.REWARD_RULES, "reward rule"))

    @field_validator("type")
    @classmethod
    def _math_verify_installed(cls, value: str) -> str:
        import importlib.util

        if value == "math_verify" and importlib.util.find_spec("math_verify") is None:
            raise ValueError("math_verify needs the math-verify package, which is not installed: pip install "
                             "'hf-pipeline[rlvr]'")
        return value


class RolloutSection(Strict):
    """Where an RL stage samples its rollouts (and its held-out sampled answers): transformers `generate` in the
    trainer's own process (`hf`), or a vLLM server in its own process and environment (`vllm`), started for the
    stage and stopped with it, whose weights follow the policy every step (docs/online-rl.md#rollouts-on-vllm)."""

    engine: Literal["hf", "vllm"] = Field("hf", description=(
        "hf: `model.generate` in the trainer (today's numbers, bit for bit); vllm: an OpenAI-compatible vLLM server"))
    python: str = Field(".venv-vllm/bin/python", description=(
        "vllm: the interpreter of the environment that has vLLM (bash requirements/vllm.sh creates "
        "`.venv-vllm`); a relative path is taken from the working directory"))
    url: str | None = Field(None, description=(
        "vllm: an already running server (http://host:port) serving the stage's starting model; it is neither "
        "started nor stopped, and must run with the flags docs/online-rl.md lists (LoRA policies: --enable-lora)"))
    sync: Literal["auto", "adapter", "merged"] = Field("auto", description=(
        "vllm: how the policy's weights reach the server before each rollout: adapter (a LoRA policy's adapter "
        "only, loaded under a new name), merged (the whole policy, LoRA merged in, reloaded in place); auto: "
        "adapter for LoRA policies on a GPU, merged otherwise (merged is the faster on CPU: docs/online-rl.md)"))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "vllm: the server's weights' dtype (auto: bfloat16 when the stage trains in bf16, else float32)"))
    max_model_len: int | None = Field(None, gt=0, description=(
        "vllm: the server's context length (null: the stage's train.max_length)"))
    kv_cache_gb: float = Field(1.0, gt=0, description="vllm on CPU: KV-cache memory of the server, in GiB")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description=(
        "vllm on a GPU: the share of the device's memory the server may take (the trainer shares the device)"))
    threads: int | None = Field(None, gt=0, description=(
        "vllm on CPU: the server's intra-op threads; default: the trainer's own (torch's thread count), which wait "
        "while the server samples"))
    start_timeout: float = Field(600.0, gt=0, description="vllm: seconds to wait for the started server's health")
    server_args: list[str] = Field(default_factory=list, description=(
        "vllm: extra command-line flags for the started server (e.g. [--enable-prefix-caching])"))
    importance_correction: bool = Field(False, description=(
        "ppo with vllm: weight each token's policy-gradient term by the truncated importance ratio "
        "min(pi_old / pi_vllm, importance_cap) of the trainer's and the server's log-probs (TRL and verl's "
        "truncated importance sampling), correcting for the two engines' numerical mismatch"))
    importance_cap: float = Field(2.0, ge=1, description="ppo with vllm: the truncation of importance_correction")


class RLStage(TrainedStage):
    """Fields every online RL stage has (PPO, GRPO, RLOO): rule rewards, sampling, and the held-out measurement."""

    rewards: list[RuleReward] = Field(default_factory=list, description=(
        "rule rewards, added to the reward model's score (GRPO/RLOO: at least one of the two is required)"))
    max_new_tokens: int = Field(32, gt=0, description="response length limit, also for the held-out greedy answers")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (PPO's log-probs use the same)")
    eval_prompts: int = Field(64, gt=0, description="held-out prompts used for the before/after metrics")
    eval_samples: int = Field(4, gt=0, description=(
        "answers sampled per held-out prompt for the sampled reward, exact match and (PPO) KL, before and after "
        "training"))
    rollout: RolloutSection = Field(default_factory=RolloutSection, exclude_if=lambda value: value == RolloutSection(),
                                    description=(
        "where rollouts are sampled: `{engine: hf}` (default) or `{engine: vllm, ...}` (a vLLM server)"))
    reward_model: str | None = Field(None, description="a `reward` stage artifact scoring each sampled answer")

    @model_validator(mode="after")
    def _some_reward(self):
        if not self.reward_model and not self.rewards:
            raise ValueError("set `reward_model:` (e.g. ${reward}) or at least one rule in `rewards:`")
        return self


class PpoStage(RLStage):
    """Our PPO on Accelerate: policy (+value head or critic), frozen reference, a learned reward model and/or rule
    rewards."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL, "reward_model": (REWARD_MODEL,),
                                                        "value_model": (REWARD_MODEL,)}
    kind: Literal["ppo"] = Field(description="`ppo`")
    reward_model: str | None = Field(None, description=(
        "`reward` stage artifact (or sequence-classification folder) scoring each (prompt, response); another "
        "tokenizer than the policy's is handled by decoding and re-encoding (null: rule `rewards:` alone, e.g. "
        "verifiable rewards; the critic is then `value_model` or a value head)"))
    value_model: str | None = Field(default=None, description="critic init; default: the reward model")
    value_head: bool = Field(False, description="a linear value head on the policy instead of a critic")
    value_lora: bool = Field(False, description="train the critic as LoRA adapters (the stage's `lora:` settings, or "
                                                "their defaults) and its score head instead of all its weights: "
                                                "no optimiser state for its backbone (~1 GB less at 135M)")
    total_episodes: int = Field(256, gt=0, description=(
        "sampled responses in the run; steps = total_episodes / rollout_batch_size"))
    rollout_batch_size: int = Field(16, gt=0, description="prompts sampled per PPO step (shared by all processes)")
    mini_batch_size: int = Field(8, gt=0, description="episodes per optimiser step (shared by all processes)")
    ppo_epochs: int = Field(2, gt=0, description="passes over each rollout batch")
    forward_batch_size: int = Field(8, gt=0, description="episodes per forward pass, grouped by prompt length: "
                                    "the no-grad scoring passes (old and reference log-probs, values, reward "
                                    "scores) and, in one process, the update's forward/backward pieces (gradients "
                                    "accumulate to the minibatch's); smaller: less memory and padding (1-2 is "
                                    "fastest on CPU at a real vocabulary), larger: fewer calls (tiny models, GPUs)")
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens (0: all)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1: all)")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip")
    clip_range_value: float = Field(0.2, gt=0, description="value clip")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty coefficient (initial value when adaptive)")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description=(
        "k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r"))
    adaptive_kl: bool = Field(False, description="Ziegler et al.'s adaptive KL coefficient")
    target_kl: float = Field(6.0, gt=0, description="adaptive KL: the KL the coefficient steers towards")
    kl_horizon: int = Field(10000, gt=0, description="adaptive KL: horizon of the coefficient's updates")
    whiten_rewards: bool = Field(False, description="whiten the per-token rewards (mean kept)")
    reward_normalization: bool = Field(True, description="standardise sequence scores within each rollout batch")
    missing_eos_penalty: float | None = Field(1.0, description=(
        "subtracted from the score of a response that hit max_new_tokens without EOS (null: off)"))
    stop_strings: list[str] = Field(default_factory=list, description=(
        "responses are cut after the first stop string (as after EOS); tokens after it are masked"))
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus")
    value_learning_rate: float | None = Field(default=None, gt=0, description=(
        "critic learning rate (null: `train.learning_rate`)"))

    @model_validator(mode="after")
    def _room_for_a_prompt(self):
        if self.max_new_tokens >= self.train.max_length:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) leaves no room for a prompt in train.max_length "
                             f"({self.train.max_length}): raise train.max_length")
        return self

    @model_validator(mode="after")
    def _one_kind_of_critic(self):
        if self.value_head and self.value_lora:
            raise ValueError("`value_lora: true` adapts a separate critic, `value_head: true` has none: set one of them")
        return self

    @model_validator(mode="after")
    def _a_critic(self):
        if not self.reward_model and not (self.value_head or self.value_model):
            raise ValueError("without `reward_model:` the critic has nothing to start from: set `value_head: true` "
                             "(a value head on the policy) or `value_model:`")
        return self


class OnlineRLStage(RLStage):
    """Fields shared by TRL's online trainers (GRPO, RLOO)."""

    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": _ANY_MODEL, "reward_model": (REWARD_MODEL,)}
    reward_model: str | None = Field(None, description=(
        "`reward` stage artifact (or sequence-classification folder); scored with its own tokenizer"))
    num_generations: int = Field(4, ge=2, description=(
        "completions per prompt (the group); batch_size x grad_accum x processes must be a multiple"))
    beta: float = Field(0.04, ge=0, description="KL coefficient against the reference model (0: no reference kept)")

    @model_validator(mode="after")
    def _ppo_corrects_importance(self):
        if self.rollout.importance_correction:
            raise ValueError("rollout.importance_correction is ppo's: TRL's GRPO/RLOO apply theirs only to their "
                             "own vLLM client; remove it (docs/online-rl.md#rollouts-on-vllm)")
        return self


class GrpoStage(OnlineRLStage):
    """Group-relative policy optimisation (TRL GRPOTrainer)."""

    kind: Literal["grpo"] = Field(description="`grpo`")
    tools: list[str] = Field(default_factory=list, exclude_if=lambda value: not value, description=(
        "tools the policy may call while it samples (TRL's multi-turn tool loop; the results are masked out of the "
        "loss), from `pipeline.rl.tools`: " + ", ".join(names.TOOLS) + "; the chat template must render tools "
        "(`chat_template: chatml-tools` for ChatML models)"))
    max_tool_calls: int = Field(3, ge=1, description="with `tools`: the most tool-calling rounds per completion")

    _tools = field_validator("tools")(lambda cls, value: [_registered(v, names.TOOLS, "tool") for v in value])

    @model_validator(mode="after")
    def _tools_on_hf(self):
        if self.tools and self.rollout.engine == "vllm":
            raise ValueError("`tools` need rollout.engine: hf (TRL runs its tool loop on its own generation, not on a "
                             "rollout function): remove one of them")
        return self


class RlooStage(OnlineRLStage):
    """REINFORCE leave-one-out (TRL RLOOTrainer)."""

    kind: Literal["rloo"] = Field(description="`rloo`")

    @model_validator(mode="after")
    def _no_vllm_rollouts(self):
        if self.rollout.engine == "vllm":
            raise ValueError("rollout.engine: vllm is not available for rloo (TRL's RLOOTrainer takes no rollout "
                             "function): use a grpo stage with vllm rollouts, or engine: hf")
        return self


class EvalSection(Strict):
    """One evaluation: which metric, on which data."""

    metric: str = Field(description=(
        "what to measure: a metric registered in `pipeline.eval.metrics.METRICS` ("
        + ", ".join(names.METRICS) + ") or lm_eval (benchmarks through lm-eval); see docs/evaluation.md"))
    data: DataSection | None = Field(None, description="held-out rows (null: the evaluated artifact's own eval data)")
    judge: str | None = Field(None, exclude_if=lambda value: value is None, description=(
        "win_rate: the reward model that judges (`${stage}`, folder or Hub id), e.g. one trained apart from the "
        "policy's own; the result is recorded as `win_rate_by_<judge>` (its stage's or folder's name), and the "
        "manifests say whether it is the reward model the policy was trained against (docs/evaluation.md)"))
    reward_model: str | None = Field(None, description=(
        "win_rate: the reward model that judges, recorded as `win_rate` (the older name of `judge`)"))
    reference: str | None = Field(None, description="win_rate: the policy to compare against")
    tasks: list[str] = Field(default_factory=list, description="lm_eval: task names (local YAML tasks included)")
    include_path: str | None = Field(None, description="lm_eval: a folder of extra task YAMLs")
    limit: int | None = Field(default=None, gt=0, description="at most this many rows (lm_eval: per task)")
    max_new_tokens: int = Field(32, gt=0, description="greedy answer length for exact_match and win_rate")

    _check_registered = field_validator("metric")(
        lambda cls, value: _registered(value, (*names.METRICS, "lm_eval"), "metric"))

    @model_validator(mode="after")
    def _one_judge(self):
        if self.judge and self.reward_model:
            raise ValueError("`judge` and `reward_model` both name win_rate's judge: set one of them")
        return self


class EvaluateStage(ModelStage):
    """Evaluate an artifact; results go to its own report artifact and into the evaluated model's card."""

    produces: ClassVar[str] = REPORT
    references: ClassVar[dict[str, tuple[str, ...]]] = {"model.path": (CAUSAL_LM, REWARD_MODEL),
                                                        "evals.reward_model": (REWARD_MODEL,),
                                                        "evals.judge": (REWARD_MODEL,),
                                                        "evals.reference": (CAUSAL_LM,)}
    kind: Literal["evaluate"] = Field(description="`evaluate`")
    evals: list[EvalSection] = Field(min_length=1, description="the evaluations to run")
    batch_size: int = Field(16, gt=0, description="rows per forward pass")


class ParallelismSection(Strict):
    """Accelerate ParallelismConfig sizes; -1 on dp_shard means 'the rest'."""

    dp_replicate: int = Field(1, ge=1, description="data-parallel replicas")
    dp_shard: int = Field(1, ge=-1, description="FSDP shards (-1: the processes left over)")
    tp: int = Field(1, ge=1, description="tensor-parallel size")
    cp: int = Field(1, ge=1, description="context-parallel size")


class Defaults(Strict):
    """Sections merged into every stage that has them; a stage's own values win."""

    train: dict[str, Any] = Field(default_factory=dict, description="`train:` keys every trainable stage starts from")
    lora: dict[str, Any] | None = Field(None, description="`lora:` keys merged into every stage that sets `lora`")


class RecipeHeader(Strict):
    """Recipe-level fields; `stages` is validated per stage kind by `pipeline.recipe`."""

    name: str = Field(description="the recipe's name: the output folder's default name and the card's prefix")
    description: str | None = Field(None, description="free text for people")
    output_dir: str | None = Field(None, description="where artifacts go (default: outputs/<name>)")
    seed: int = Field(42, description="every stage's seed, unless the stage sets its own")
    license: str = Field("apache-2.0", description="license in every model card")
    defaults: Defaults = Field(default_factory=Defaults, description="sections merged into every stage that has them")
    push_to_hub: HubTarget | None = Field(None, description="push every stage to this repo, one branch per stage")
    parallelism: ParallelismSection | None = Field(None, description=(
        "Accelerate ParallelismConfig sizes (docs/scaling.md)"))
    report_to: Tracker | list[Tracker] = Field(default="none", description="every stage's trackers unless the "
                                               "stage sets its own; " + REPORT_TO_HELP)
    stages: dict[str, dict[str, Any]] = Field(description=(
        "stage name -> its settings (`kind:` and that kind's fields), run in dependency order"))

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
