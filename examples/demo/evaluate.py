"""Held-out evaluation: ask each held-out question with ``generate`` and compare the first word of the answer
with the truth, per attribute."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from PIL import Image


def load_heldout(corpus_dir: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Held-out rows (``image``, ``attribute``, ``answer``, question). ``limit`` takes an even subset (same for
    every call with the same seed) so that intermediate evaluations stay cheap."""
    with open(os.path.join(corpus_dir, "heldout.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        r["question"] = r["conversations"][0]["value"].replace("<image>", "").strip()
    if limit is not None and limit < len(rows):
        import random

        rows = random.Random(seed).sample(rows, limit)
    return rows


def first_word(text: str) -> str:
    words = text.strip().lower().replace(".", " ").split()
    return words[0] if words else ""


@torch.inference_mode()
def answer(model, processor, corpus_dir: str, rows: list[dict], batch_size: int = 48,
           max_new_tokens: int = 3) -> list[str]:
    """Greedy answers (decoded text) to the rows' questions, batched with left padding."""
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        convs = []
        for r in chunk:
            img = Image.open(os.path.join(corpus_dir, r["image"])).convert("RGB")
            convs.append([{"role": "user",
                           "content": [{"type": "image", "image": img}, {"type": "text", "text": r["question"]}]}])
        inputs = processor.apply_chat_template(
            convs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            padding_side="left")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        tok = processor.tokenizer
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = gen[:, inputs["input_ids"].shape[1]:]
        out += [tok.decode(g, skip_special_tokens=True).strip() for g in new]
    return out


def accuracy(rows: list[dict], answers: list[str]) -> dict[str, float]:
    """{attribute: fraction correct} plus ``"all"``."""
    hits, totals = defaultdict(int), defaultdict(int)
    for r, a in zip(rows, answers):
        ok = first_word(a) == r["answer"]
        for key in (r["attribute"], "all"):
            hits[key] += ok
            totals[key] += 1
    return {k: hits[k] / totals[k] for k in totals}


def evaluate(model, processor, corpus_dir: str, rows: list[dict], **kw) -> tuple[dict[str, float], list[str]]:
    answers = answer(model, processor, corpus_dir, rows, **kw)
    return accuracy(rows, answers), answers
