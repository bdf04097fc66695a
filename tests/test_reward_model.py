"""The reward model as the reward stage builds and reads it: a GGUF start point is trainable with full weights, the
head reads the last token of the answer (pad == eos, right padding), a LoRA reward model trains its `score` head, and
pairs that fit `max_length` are never cut to the same tokens."""
from __future__ import annotations

import pytest

from pipeline import models, schema


def tiny_classifier(vocab_size: int = 64, pad_token_id: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         num_labels=1, pad_token_id=pad_token_id)
    return LlamaForSequenceClassification(config)


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}")


def chat_tokenizer():
    """A word-level ChatML tokenizer padding with its eos `<|im_end|>`, as SmolLM2's does."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|pad|>", "<|im_start|>", "<|im_end|>", "[UNK]", "user", "assistant", "question", "number", "about",
             "words", "answer", "last", "a", "good", "bad", "one", "hi", "hello", "there", "go"] + [str(i) for i in
                                                                                                   range(10)]
    tokenizer = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.pad_token = fast.eos_token
    fast.chat_template = CHATML
    return fast


def test_a_reward_model_started_from_a_gguf_file_is_trainable_with_full_weights(tmp_path, monkeypatch):
    """transformers dequantises a GGUF checkpoint on load but leaves the model marked quantized, and the Trainer
    then refuses full fine-tuning ("cannot perform fine-tuning on purely quantized models"), after the stage has
    spent minutes on the before-training measure. The causal-LM loader unmarks it; the reward-model loader must too."""
    import transformers
    from transformers.trainer_utils import validate_quantization_for_training

    def from_pretrained(path, num_labels=1, **kwargs):
        assert kwargs["gguf_file"] == "model.gguf"
        model = tiny_classifier()
        model.hf_quantizer = object()  # as transformers leaves a GGUF-loaded model
        model.is_quantized = True
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", from_pretrained)
    (tmp_path / "model.gguf").write_bytes(b"")
    section = schema.ModelSection(path=str(tmp_path), gguf_file="model.gguf", architecture="llama", dtype="float32")
    model = models.load_reward_model(str(tmp_path), section)
    assert model.hf_quantizer is None and not model.is_quantized
    assert not hasattr(model.config, "quantization_config")
    validate_quantization_for_training(model)  # raised ValueError before


def test_the_head_reads_the_last_answer_token_when_pad_is_eos():
    """SmolLM2's tokenizer pads with its eos `<|im_end|>`; `reward_text` drops the closing marker, so with right
    padding the last non-pad token the classifier pools is the answer's last token, whatever its length."""
    import torch

    eos = 2
    model = tiny_classifier(pad_token_id=eos).eval()
    long = [5, 6, eos, 7, 8, 9]   # an earlier turn's end marker inside the conversation
    short = [5, 6, eos, 7]
    ids = torch.tensor([long, short + [eos, eos]])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0, 0]])
    with torch.no_grad():
        pooled = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        alone = model(input_ids=torch.tensor([short])).logits[0, 0]
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        per_token = model.score(hidden)[..., 0]
    assert torch.allclose(pooled[0], per_token[0, 5]) and torch.allclose(pooled[1], per_token[1, 3])
    assert torch.allclose(pooled[1], alone, atol=1e-5)


def test_a_lora_reward_model_trains_its_score_head():
    from peft import get_peft_model

    model = tiny_classifier()
    lora = models.lora_config(schema.LoraSection(r=4, alpha=8, dropout=0.0), task_type="SEQ_CLS")
    peft_model = get_peft_model(model, lora)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any("score" in name for name in trainable), trainable
    assert any("lora_" in name for name in trainable)


@pytest.mark.parametrize("max_length", [48, 64])
def test_pairs_kept_at_max_length_are_never_cut_to_the_same_tokens(tmp_path, max_length):
    """HH pairs differ only in the last assistant turn, which cutting at `max_length` from the right removes first;
    the reward stage drops over-long pairs (`too_long_for`) instead of truncating them, so none it trains on is
    identical on both sides."""
    import json

    from pipeline import data as data_lib
    from pipeline.stages.reward import tokenized_pairs
    tokenizer = chat_tokenizer()
    shared = "".join(f"\n\nHuman: question number {i} about words\n\nAssistant: answer number {i}" for i in range(4))
    rows = [{"chosen": shared + f"\n\nHuman: last {k}\n\nAssistant: a good answer {k}",
             "rejected": shared + f"\n\nHuman: last {k}\n\nAssistant: a bad one {k}"} for k in range(6)]
    rows += [{"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: go"}]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = schema.DataSection(path=str(path), on_bad_rows="skip")
    loaded = data_lib.load_data(section, "preference", too_long=data_lib.too_long_for(tokenizer, max_length))
    pairs = tokenized_pairs(loaded.train, tokenizer, max_length)
    assert len(pairs) >= 1
    for pair in pairs:
        assert pair["chosen_ids"] != pair["rejected_ids"]
        assert len(pair["chosen_ids"]) <= max_length and len(pair["rejected_ids"]) <= max_length
