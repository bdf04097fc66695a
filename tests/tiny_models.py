"""Tiny chat models for tests that need real folders: a ChatML tokenizer trained on the repo's data and a randomly
initialised Llama (causal LM or one-label classifier), saved together as a `from_pretrained` folder.

    from tiny_models import save_tiny_chat_model
    save_tiny_chat_model(folder, texts)                          # policy
    save_tiny_chat_model(folder, texts, reward=True)             # reward model
"""
from __future__ import annotations

from pathlib import Path


def save_tiny_chat_model(folder: Path, texts: list[str], *, hidden: int = 32, intermediate: int = 64,
                         layers: int = 1, reward: bool = False, seed: int | None = 0, vocab: int = 400,
                         positions: int = 256, chat_template: str = "chatml",
                         extra_tokens: tuple[str, ...] = ()) -> Path:
    """A tokenizer trained on `texts` (`vocab` tokens, `chat_template`) and a Llama of the given sizes and context
    (`positions`; `extra_tokens`: whole strings added as single tokens), its weights drawn from `seed` (None: from the random state as it is, e.g. a second model right
    after a first), saved into `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline.stages.tokenizer import build

    tokenizer = build(texts, vocab, 1, chat_template, positions)
    tokenizer.add_tokens(list(extra_tokens))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=positions, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **({"num_labels": 1} if reward else {}))
    if seed is not None:
        torch.manual_seed(seed)
    model = (LlamaForSequenceClassification if reward else LlamaForCausalLM)(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
