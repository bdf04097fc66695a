"""Measurements on held-out data shared by stages, evaluation and PPO: language-model loss, sequence log-probs
of completions, reward-model scores, pairwise accuracy and greedy answers (checked by `pipeline.eval.answers`).

Pure evaluation code (no training), batched, under `torch.no_grad`. Called at run time; nothing runs at import.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _device(model):
    return next(model.parameters()).device


def render(tokenizer, prompt: list[dict], completion: list[dict] | None = None,
           tools: list | None = None) -> tuple[str, str]:
    """(prompt text with generation prompt, completion text) under the tokenizer's chat template; `tools`: the tool
    functions (or schemas) the template shows in the prompt."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                                **({"tools": tools} if tools else {}))
    if completion is None:
        return prompt_text, ""
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(prompt_text):  # templates that rewrite earlier turns: fall back to plain concat
        return prompt_text, completion[-1]["content"] + (tokenizer.eos_token or "")
    return prompt_text, full[len(prompt_text):]


def completion_logprobs(model, tokenizer, prompts: list[list[dict]], completions: list[list[dict]],
                        batch_size: int = 16, max_length: int = 1024) -> list[float]:
    """Sum of log p(completion tokens | prompt) for each pair."""
    import torch

    device, scores = _device(model), []
    pairs = [render(tokenizer, p, c) for p, c in zip(prompts, completions)]
    model.eval()
    with torch.no_grad():
        for batch in _batches(pairs, batch_size):
            ids, masks = [], []
            for prompt_text, completion_text in batch:
                p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
                c = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
                seq = (p + c)[:max_length]
                ids.append(seq)
                masks.append(([0] * len(p) + [1] * len(c))[:max_length])
            width = max(len(s) for s in ids)
            pad = tokenizer.pad_token_id or 0
            input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in ids], device=device)
            attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], device=device)
            target_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            for row in range(len(batch)):  # one row at a time: the batch's float log-softmax is 2 copies of B x T x V
                logp = torch.log_softmax(logits[row, :-1].float(), -1).gather(-1, input_ids[row, 1:, None]).squeeze(-1)
                scores.append((logp * target_mask[row, 1:]).sum().item())
    return scores


def reward_text(tokenizer, prompt: list[dict], completion: list[dict]) -> str:
    """The conversation as our reward models read it: chat-rendered, ending at the answer's last character.

    The end-of-turn marker (`<|im_end|>` and the newline after it) is dropped: the sequence-classification head reads
    the last token, and a model's state at a marker that always follows an answer need not depend on the answer (in
    the quickstart's pretrained model it is bit-identical for right and wrong answers). The reward stage trains on
    exactly this text and PPO, GRPO/RLOO and evaluation score with it."""
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    content = completion[-1]["content"].rstrip() if completion else ""
    cut = full.rfind(content) if content else -1
    return full[:cut + len(content)] if cut >= 0 else full


def reward_scores(model, tokenizer, prompts: list[list[dict]], completions: list[list[dict]],
                  batch_size: int = 16, max_length: int = 1024) -> list[float]:
    """Scalar reward-model scores of each (prompt, completion) conversation, read as `reward_text` renders it."""
    import torch

    device, scores = _device(model), []
    texts = [reward_text(tokenizer, p, c) for p, c in zip(prompts, completions)]
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        with torch.no_grad():
            for batch in _batches(texts, batch_size):
                enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                                add_special_tokens=False).to(device)
                scores += model(**enc).logits[:, 0].float().tolist()
    finally:
        tokenizer.padding_side = padding_side
    return scores


def pairwise_accuracy(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Fraction of pairs where chosen scores above rejected, and the mean margin."""
    wins = [c > r for c, r in zip(chosen, rejected)]
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(wins) / max(len(wins), 1), "margin": sum(margins) / max(len(margins), 1)}


def lm_loss(model, tokenizer, texts: list[str], batch_size: int = 8, max_length: int = 512) -> float:
    """Mean token cross-entropy of `texts` (perplexity = exp of it)."""
    import torch

    device = _device(model)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in _batches(texts, batch_size):
            enc = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for t in batch]
            width = max(len(s) for s in enc)
            pad = tokenizer.pad_token_id or 0
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in enc], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in enc], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            total += (nll * mask[:, 1:]).sum().item()
            count += mask[:, 1:].sum().item()
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 32, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, tools: list | None = None) -> list[str]:
    """Greedy (or sampled, at `temperature`) completions for chat prompts (showing `tools`, when given), decoded
    without special tokens."""
    import torch

    device, outputs = _device(model), []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.no_grad():
            for batch in _batches(prompts, batch_size):
                texts = [render(tokenizer, p, tools=tools)[0] for p in batch]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample \
                    else {"do_sample": False}
                out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id, **sampling)
                outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return outputs


@contextmanager
def seeded_sampling(seed: int) -> Iterator[None]:
    """Draw random numbers from `seed` inside, and leave the global random state as it was.

    Sampled measurements of a policy before and after training then use the same random numbers (a paired
    comparison: what differs is the policy, not the luck of the draw), and the training in between draws exactly
    what it would without them."""
    import torch

    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        torch.manual_seed(seed)
        yield
