#!/usr/bin/env python
"""Data-loader throughput: synthetic ~448 px images + a LLaVA JSONL → VoRADataset → VoRACollator → DataLoader.

    python scripts/bench_data.py --n 256 --workers 0 2

Prints samples/s and images/s for each worker count. Uses a tokenizer from --tokenizer (a local directory) or,
by default, the tiny byte-level BPE tokenizer of the tests (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vora.collator import VoRACollator  # noqa: E402
from vora.data import VoRADataset  # noqa: E402
from vora.model.image_processing_vora import VoRAImageProcessor  # noqa: E402
from vora.model.processing_vora import VoRAProcessor  # noqa: E402


def make_corpus(root: str, n: int, seed: int = 0, text_only_frac: float = 0.1) -> tuple[str, int]:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    n_images = 0
    # A few distinct base images, written as many files (decoding cost is what we measure, not generation).
    bases = [rng.integers(0, 256, size=(512, 512, 3), dtype=np.uint8) for _ in range(4)]
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for i in range(n):
            q = "What is in the image? Describe the picture in detail."
            a = "There are two dogs playing in the park, next to a red ball. " * int(rng.integers(1, 4))
            if rng.random() < text_only_frac:
                rec = {"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            else:
                h, w = (int(x) for x in rng.integers(400, 500, size=2))
                img = Image.fromarray(bases[i % len(bases)][:h, :w])
                name = f"images/{i:06d}.jpg"
                img.save(os.path.join(root, name), quality=90)
                n_images += 1
                rec = {"id": i, "image": name,
                       "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}
            f.write(json.dumps(rec) + "\n")
    return os.path.join(root, "train.jsonl"), n_images


def load_tokenizer(path: str | None, tmp: str):
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path)
    from tests.helpers_data import build_tokenizer

    return build_tokenizer(os.path.join(tmp, "tok"), "chatml")


def run(ds, collator, workers: int, batch_size: int, n_images: int) -> dict:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collator,
                                         shuffle=False, persistent_workers=False)
    ds.stats.reset()
    t0 = time.perf_counter()
    n_rows = n_img = 0
    for batch in loader:
        n_rows += batch["input_ids"].shape[0]
        n_img += batch["image_grid_hw"].shape[0]
    dt = time.perf_counter() - t0
    rep = ds.stats.report(log=False)
    return {"workers": workers, "seconds": dt, "samples": rep["ok"], "images": n_img,
            "samples_per_s": rep["ok"] / dt, "images_per_s": n_img / dt, "skipped": rep["skipped_total"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="number of samples (≈90%% with one image)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--max-pixels", type=int, default=448 * 448)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: tiny test tokenizer)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        jsonl, n_images = make_corpus(tmp, args.n)
        print(f"corpus: {args.n} samples, {n_images} images (400-500 px sides) in {time.perf_counter() - t:.1f}s")
        proc = VoRAProcessor(image_processor=VoRAImageProcessor(max_pixels=args.max_pixels),
                             tokenizer=load_tokenizer(args.tokenizer, tmp))
        t = time.perf_counter()
        ds = VoRADataset([jsonl], proc, max_length=args.max_length, cache_dir=os.path.join(tmp, "cache"))
        print(f"dataset: {len(ds)} rows, Arrow cache built in {time.perf_counter() - t:.2f}s")
        collator = VoRACollator(proc.pad_token_id, max_length=args.max_length, packing=args.packing)
        for w in args.workers:
            r = run(ds, collator, w, args.batch_size, n_images)
            print(f"num_workers={w}: {r['samples_per_s']:.1f} samples/s, {r['images_per_s']:.1f} images/s "
                  f"({r['samples']} samples, {r['images']} images in {r['seconds']:.2f}s, {r['skipped']} skipped)")


if __name__ == "__main__":
    main()
