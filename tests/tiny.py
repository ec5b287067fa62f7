"""Tiny random models with an offline BPE tokenizer and a ChatML template, for fast engine tests."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from kvstore.engine.models import LoadedModel, prepare_model

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the vault keeps its secret passcode.",
    "Repeat the previous context exactly, starting with the part that matters most.",
    "Question: what is the special magic number for the blue whale? Answer with digits 0123456789.",
    "Startups grow when founders talk to users, write code, and measure what matters every week.",
]


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    from tokenizers import decoders

    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tok.chat_template = CHATML
    return tok


_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_key_value_heads=2, max_position_embeddings=4096
)
CONFIGS = {  # GQA everywhere; Qwen2 adds q/k/v biases, Qwen3 q/k norms and an explicit head_dim
    "llama": lambda v: LlamaConfig(vocab_size=v, num_attention_heads=4, **_COMMON),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, num_attention_heads=6, **_COMMON),
    "qwen3": lambda v: Qwen3Config(vocab_size=v, num_attention_heads=4, head_dim=16, **_COMMON),
}


def tiny_model(family: str = "llama", seed: int = 0) -> LoadedModel:
    """A randomly initialised GQA model of `family`, fp32 on CPU, routed through kvstore attention."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = CONFIGS[family](len(tokenizer))
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return prepare_model(f"tiny-{family}", model, tokenizer)


def sample_text(words: int, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    vocab = " ".join(CORPUS).replace(",", "").replace(".", "").replace("?", "").replace(":", "").split()
    picks = torch.randint(len(vocab), (words,), generator=gen).tolist()
    return " ".join(vocab[i] for i in picks) + "."
