"""Tiny random-weight models and a tokenizer trained in code, for fast unit tests.

Nothing here touches the network: the tokenizer is a byte-level BPE trained on a few sentences and
the models are built from configs with a fixed seed.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France?\nAnswer: Paris",
    "A licence grants permission to use, copy and modify the software.",
    "The patient presented with fever, cough and shortness of breath.",
    "def main():\n    return 42",
] * 20


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def _common(**overrides):
    tok = tiny_tokenizer()
    base = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    base.update(overrides)
    return base


def tiny_llama(gqa: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**_common(num_key_value_heads=2 if gqa else 4))
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(**_common(num_key_value_heads=2))
    return Qwen2ForCausalLM(config).eval()


def tiny_mistral(seed: int = 0, sliding_window: int = 4) -> MistralForCausalLM:
    """GQA with a sliding window shorter than the test sequences, so the window really drops keys."""
    torch.manual_seed(seed)
    config = MistralConfig(**_common(num_key_value_heads=2, sliding_window=sliding_window))
    return MistralForCausalLM(config).eval()


def save_tiny(model, directory) -> str:
    """Save a tiny model with its tokenizer as a plain HF directory and return the path."""
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)
