"""`pretrain` stage: causal-LM training on text, from a config (Llama by default: RMSNorm, RoPE, grouped-query
attention, SwiGLU) or continued pretraining of an existing model. Thin glue over TRL's SFTTrainer on a `text`
dataset with packing on. Metrics: held-out loss and perplexity before and after.
"""
from __future__ import annotations

from pipeline import data as data_lib
from pipeline import models, training
from pipeline.eval import measures
from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import load_stage_data, run_trainer


def load_model_and_tokenizer(ctx: StageContext):
    cfg = ctx.config
    tokenizer_path = ctx.resolve(cfg.tokenizer) or ctx.resolve(cfg.model.path)
    tokenizer = models.load_tokenizer(tokenizer_path, trust_remote_code=cfg.model.trust_remote_code,
                                      gguf_file=None if cfg.tokenizer else cfg.model.gguf_file)
    if cfg.model.path:
        model = models.load_causal_lm(ctx.resolve(cfg.model.path), cfg.model)
        base = ctx.resolve(cfg.model.path)
    else:
        model = models.build_from_config(cfg.model, tokenizer)
        base = None
    return model, tokenizer, base


def document_separator(tokenizer) -> str:
    """The token between packed documents: `<|endoftext|>` (the BOS of our tokenizers) when the tokenizer has one
    distinct from its EOS. With ChatML the EOS `<|im_end|>` ends a chat turn; packing documents with it would teach
    the model that nothing before `<|im_end|>` matters, so SFT answers and reward scores could not see the prompt."""
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    return bos if bos and bos != eos and bos == "<|endoftext|>" else eos


def end_of_sequence(model, tokenizer) -> tuple[str, object, object]:
    """The tokenizer's EOS, the model config's and the generation config's EOS ids, before training."""
    generation = getattr(model, "generation_config", None)
    return tokenizer.eos_token, model.config.eos_token_id, getattr(generation, "eos_token_id", None)


def restore_end_of_sequence(model, tokenizer, saved: tuple[str, object, object]) -> None:
    """Give the artifact back the EOS it had before training. TRL's SFTTrainer makes the packing separator
    (`<|endoftext|>`) the tokenizer's and the model's EOS; saved that way, every later stage would generate past a
    chat turn's `<|im_end|>` (greedy answers read the next turn's numbers, PPO charges a missing-EOS penalty)."""
    tokenizer.eos_token, model.config.eos_token_id, generation_eos = saved
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = generation_eos


def held_out_measures(tokenizer, texts: list[str], max_length: int):
    """Held-out loss before and after, and the perplexity after."""
    def measure(model, phase: str) -> dict:
        loss = measures.lm_loss(model, tokenizer, texts, max_length=max_length)
        return {"eval_loss_before": loss} if phase == "before" else {
            "eval_loss_after": loss, "eval_perplexity_after": measures.perplexity(loss)}

    return measure


def run(ctx: StageContext) -> StageResult:
    from trl import SFTConfig, SFTTrainer

    cfg = ctx.config
    model, tokenizer, base = load_model_and_tokenizer(ctx)
    loaded = load_stage_data(ctx, text_fields=[cfg.text_field])
    packing = True if cfg.train.packing is None else cfg.train.packing
    args = SFTConfig(**training.trainer_kwargs(ctx, cfg.train), dataset_text_field="text",
                     max_length=cfg.train.max_length, packing=packing, packing_strategy="wrapped",
                     eos_token=document_separator(tokenizer), completion_only_loss=False)
    chat_eos = end_of_sequence(model, tokenizer)
    eval_texts = loaded.eval["text"] if loaded.eval is not None else None
    return run_trainer(
        ctx, tokenizer=tokenizer, model=model, loaded=loaded,
        metrics={"parameters": sum(p.numel() for p in model.parameters()), "train_rows": len(loaded.train)},
        measure=held_out_measures(tokenizer, eval_texts, cfg.train.max_length) if eval_texts else None,
        make_trainer=lambda: SFTTrainer(model=model, args=args, train_dataset=loaded.train, processing_class=tokenizer),
        before_save=lambda trainer: restore_end_of_sequence(trainer.model, tokenizer, chat_eos),
        merge_lora=False, base_model=base, library_name="transformers", tags=["pretraining"])
