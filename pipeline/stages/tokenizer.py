"""`tokenizer` stage: train a byte-level BPE tokenizer on a corpus and save it as a fast tokenizer with a chat
template (ChatML by default). Runs on the main process only (it is quick); other ranks wait at the runner's barrier.
"""
from __future__ import annotations

from pipeline import chat_templates
from pipeline.stages.common import load_stage_data
from pipeline.stage import StageContext, StageResult

SPECIAL = {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>"}


def build(texts, vocab_size: int, min_frequency: int, chat_template: str, model_max_length: int):
    """A PreTrainedTokenizerFast trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   additional_special_tokens=["<|im_start|>"], **SPECIAL)
    fast.chat_template = chat_templates.TEMPLATES.get(chat_template, chat_template)
    return fast


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config
    loaded = load_stage_data(ctx, text_fields=cfg.text_fields)
    texts = loaded.train["text"]
    if ctx.is_main:
        tokenizer = build(texts, cfg.vocab_size, cfg.min_frequency, cfg.chat_template, cfg.model_max_length)
        tokenizer.save_pretrained(ctx.output_dir)
        sample = texts[: min(len(texts), 500)]
        n_tokens = sum(len(tokenizer(t)["input_ids"]) for t in sample)
        metrics = {"vocab_size": len(tokenizer), "chars_per_token": round(sum(map(len, sample)) / max(n_tokens, 1), 3),
                   "train_texts": len(texts)}
    else:
        metrics = {}
    return StageResult(metrics=metrics, datasets=loaded.sources, held_out=loaded.held_out, library_name="transformers",
                       pipeline_tag=None, tags=["tokenizer"])
