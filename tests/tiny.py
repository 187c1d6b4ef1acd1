"""Tiny random-init LLM checkpoints for model / LoRA / distillation tests: configs → save_pretrained →
from_pretrained, exactly the path a user's real checkpoint takes. Nothing is downloaded. The builder
itself lives in tests/vora_world.py (shared with the merge / serving world)."""

from pathlib import Path

from tests.vora_world import save_llm

VOCAB = 96
IMAGE_TOKEN_ID = 100  # beyond the LLM vocabulary on purpose: VoRA must not need an embedding row


def save_tiny_llm(path, arch="qwen2", seed=0, vocab=VOCAB, **kwargs) -> str:
    return str(save_llm(Path(path), arch, vocab, seed=seed, **kwargs))
