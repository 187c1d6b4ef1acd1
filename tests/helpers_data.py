"""Helpers for the data tests: tiny tokenizers built locally (no hub), synthetic images and annotation files."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is in the image? A cat sitting on a red mat, next to a blue ball.",
    "Describe the picture in detail. There are two dogs playing in the park.",
    "Hello! How are you today? I am fine, thank you.",
    "user assistant system You are a helpful assistant.",
    "0123456789 colours: red green blue yellow; shapes: square circle triangle",
]

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>",
]


def build_tokenizer(path: str, template: str | None = "chatml", with_image_token: bool = False):
    """A byte-level BPE tokenizer trained on a few sentences (exact decode round trip), saved to ``path``
    with ``save_pretrained`` and loaded back with ``AutoTokenizer``. ``template``: "chatml", "llama3" or None."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = SPECIALS + (["<image>"] if with_image_token else [])
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    kwargs = dict(tokenizer_object=tk, pad_token="<|endoftext|>")
    if template == "chatml":
        kwargs.update(eos_token="<|im_end|>")
    elif template == "llama3":
        kwargs.update(eos_token="<|eot_id|>", bos_token="<|begin_of_text|>")
    else:
        kwargs.update(eos_token="<|endoftext|>")
    fast = PreTrainedTokenizerFast(**kwargs)
    if template == "chatml":
        fast.chat_template = CHATML
    elif template == "llama3":
        fast.chat_template = LLAMA3
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def build_processor(tmp_path, template="chatml", **ip_kwargs):
    from vora.model.image_processing_vora import VoRAImageProcessor
    from vora.model.processing_vora import VoRAProcessor

    tok = build_tokenizer(str(tmp_path / f"tok_{template}"), template)
    ip = VoRAImageProcessor(**{"min_pixels": 14 * 14, "max_pixels": 56 * 56, **ip_kwargs})
    return VoRAProcessor(image_processor=ip, tokenizer=tok)


def make_image(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, mode="RGB")
    return img if mode == "RGB" else img.convert(mode)


def save_image(path: str, h: int = 40, w: int = 60, seed: int = 0) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    make_image(h, w, seed).save(path)
    return path


def write_jsonl(path: str, rows: list, raw_lines: dict[int, str] | None = None) -> str:
    """Write rows as JSON lines; ``raw_lines`` {0-based position: text} inserts literal (e.g. malformed) lines."""
    lines = [json.dumps(r) for r in rows]
    for pos, text in sorted((raw_lines or {}).items()):
        lines.insert(pos, text)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# A minimal valid recipe (its paths need not exist: recipe validation does not open them).
MINIMAL_RECIPE = """
model: {llm: /models/llm}
lora: {layers: 2, rank: 4}
data: {sources: [/data/a.jsonl, {path: /data/b.jsonl, weight: 2, image_root: /img}]}
train: {output_dir: /out, learning_rate: 2e-4, warmup_steps: 100, lr_scheduler_type: constant_with_warmup}
"""


def write_recipe(tmp_path, text: str) -> str:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return str(path)
