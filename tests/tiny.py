"""Tiny random-init checkpoints for tests: configs → save_pretrained → from_pretrained, exactly the
path a user's real checkpoint takes. Nothing is downloaded."""

import os

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

VOCAB = 96
IMAGE_TOKEN_ID = 100  # beyond the LLM vocabulary on purpose: VoRA must not need an embedding row


def llm_config(arch="qwen2", layers=4, hidden=64, vocab=VOCAB):
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(arch)


def save_tiny_llm(path, arch="qwen2", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llm_config(arch, **kwargs))
    # Random init has tiny weights; make the function non-trivial so mask errors show in the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path
