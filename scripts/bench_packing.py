#!/usr/bin/env python
"""Packing vs padding: useful (label + image) tokens per second of VoRA training steps on a mixed-length corpus.

    python scripts/bench_packing.py                       # tiny CPU model, well under a minute
    python scripts/bench_packing.py --shape mid           # a mid CPU shape (minutes)
    python scripts/bench_packing.py --device cuda --shape S   # Qwen2.5-0.5B shape, bf16, flex_attention

The corpus mixes text-only samples (50–1500 tokens, all labelled) with captioning samples holding 1 or 2 images
(image tokens + a labelled caption). Lengths scale with the shape (`tiny` divides them by 4). The same model, in
the same process, trains on the same micro-batches of `--batch` samples twice per round: padded (one sample per row)
and packed (first-fit into rows of `--max-length`). Both use `VoRACollator` with `pad_to_multiple_of` (128 with
flex_attention, else 8). A step is forward, backward and AdamW on LoRA + patch embedding; the first micro-batch of
each mode is a warm-up. Rounds alternate padded / packed; the figure is the median round. Models are built from
configs with random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vora import VoRAConfig, VoRAForCausalLM  # noqa: E402
from vora.build import flex_training_problem  # noqa: E402
from vora.collator import VoRACollator  # noqa: E402
from vora.generate import device_problem  # noqa: E402

# name: LLM (hidden, layers, heads, kv heads, ffn, vocab), patch, LoRA rank, corpus (samples, text scale, max image
# side in patches), micro-batch, row capacity
SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, ffn=128, vocab=512, patch=4, rank=8,
                 samples=32, scale=0.25, max_side=8, batch=8, max_length=512),
    "mid": dict(hidden=512, layers=4, heads=8, kv=2, ffn=1408, vocab=8192, patch=14, rank=32,
                samples=16, scale=1.0, max_side=24, batch=4, max_length=2048),
    "S": dict(hidden=896, layers=24, heads=14, kv=2, ffn=4864, vocab=151936, patch=14, rank=512,
              samples=256, scale=1.0, max_side=24, batch=8, max_length=2048),
}


def make_corpus(n: int, scale: float, max_side: int, vocab: int, image_token_id: int, patch: int, seed: int = 0):
    """Half text-only (50–1500 tokens × scale, every token a label), half captioning (1 or 2 images of 4..max_side
    patches a side, then a 20–300 × scale token caption as labels)."""
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    def text(k):
        return torch.randint(3, vocab, (k,), generator=g)

    samples = []
    for i in range(n):
        if i % 2 == 0:
            ids = text(max(2, round(randint(50, 1500) * scale)))
            samples.append({"input_ids": ids, "labels": ids.clone()})
            continue
        grids = [(randint(4, max_side), randint(4, max_side)) for _ in range(1 + (i % 4 == 3))]
        prompt = [torch.full((h * w,), image_token_id) for h, w in grids]
        caption = text(max(2, round(randint(20, 300) * scale)))
        ids = torch.cat([text(3), *prompt, caption])
        labels = torch.cat([torch.full((len(ids) - len(caption),), -100), caption])
        pixels = torch.randn(sum(h * w for h, w in grids), 3 * patch * patch, generator=g)
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": pixels,
                        "image_grid_hw": torch.tensor(grids, dtype=torch.long)})
    return samples


def useful_tokens(samples) -> int:
    labels = sum(int((s["labels"] != -100).sum()) for s in samples)
    return labels + sum(int(h * w) for s in samples for h, w in s.get("image_grid_hw", []))


def build_model(shape: dict, attn: str, dtype, device):
    from transformers import Qwen2Config

    from vora.lora import add_lora

    text = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv"], max_position_embeddings=8192, tie_word_embeddings=False)
    config = VoRAConfig(text_config=text, image_token_id=shape["vocab"], patch_size=shape["patch"],
                        vision_embed_dim=min(1024, shape["hidden"]), position_grid=shape["max_side"])
    torch.manual_seed(0)
    with torch.device(device):
        model = VoRAForCausalLM(config).to(dtype)
    model.set_attn_implementation(attn)
    add_lora(model, num_layers=shape["layers"], rank=shape["rank"])
    model.vision_embed.requires_grad_(True)
    return model.train()


def train_step(model, optimizer, batch):
    out = model(**batch)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss


def run_epoch(model, optimizer, batches, device) -> float:
    """Seconds for one pass over the prepared batches."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in batches:
        train_step(model, optimizer, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    else:
        torch.zeros(()).item()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: tiny on cpu, S on cuda")
    p.add_argument("--attn", default=None, help="attention kernel (default: flex_attention on cuda, sdpa on cpu)")
    p.add_argument("--samples", type=int, default=None, help="corpus size (default: the shape's)")
    p.add_argument("--batch", type=int, default=None, help="samples per micro-batch (default: the shape's)")
    p.add_argument("--max-length", type=int, default=None, help="packed row capacity (default: the shape's)")
    p.add_argument("--rounds", type=int, default=3, help="alternating padded / packed rounds (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if problem := device_problem(args.device):
        p.error(f"--device {problem}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(SHAPES[args.shape or ("S" if device.type == "cuda" else "tiny")])
    for key in ("samples", "batch", "max_length"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    attn = args.attn or ("flex_attention" if device.type == "cuda" else "sdpa")
    if attn == "flex_attention" and (problem := flex_training_problem(device)):
        raise SystemExit(f"bench_packing: error: --attn: {problem}: --attn sdpa")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bucket = 128 if attn == "flex_attention" else 8

    corpus = make_corpus(shape["samples"], shape["scale"], shape["max_side"], shape["vocab"], shape["vocab"],
                         shape["patch"], seed=args.seed)
    too_long = [len(s["input_ids"]) for s in corpus if len(s["input_ids"]) > shape["max_length"]]
    if too_long:
        raise SystemExit(f"bench_packing: error: {len(too_long)} samples exceed --max-length {shape['max_length']}")
    micro = [corpus[i : i + shape["batch"]] for i in range(0, len(corpus), shape["batch"])]
    # image_token_id: the collator checks placeholders on the host and passes the geometry along (vora-train's path)
    common = dict(pad_to_multiple_of=bucket, patch_size=shape["patch"], image_token_id=shape["vocab"])
    collators = {
        "padded": VoRACollator(0, **common),
        "packed": VoRACollator(0, max_length=shape["max_length"], packing=True, **common),
    }
    batches = {mode: [{k: v.to(device) if torch.is_tensor(v) else v for k, v in col(m).items()} for m in micro]
               for mode, col in collators.items()}
    for mode in batches:
        for b in batches[mode]:
            b["pixel_values"] = b["pixel_values"].to(dtype)

    model = build_model(shape, attn, dtype, device)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    useful = useful_tokens(corpus)
    n_images = sum(len(s.get("image_grid_hw", [])) for s in corpus)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    from torch._dynamo.utils import counters

    for mode in batches:  # warm-up (and compilation) on the first micro-batch of each mode
        run_epoch(model, optimizer, batches[mode][:1], device)
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    times = {mode: [] for mode in batches}
    for _ in range(args.rounds):
        for mode in batches:
            times[mode].append(run_epoch(model, optimizer, batches[mode], device))

    gpu = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
    print(f"bench_packing: device {device}{gpu}, "
          f"threads {torch.get_num_threads()}, shape {args.shape or ('S' if device.type == 'cuda' else 'tiny')} "
          f"({shape['layers']}x{shape['hidden']}, LoRA r{shape['rank']}), {attn}, {str(dtype).split('.')[-1]}")
    print(f"corpus: {len(corpus)} samples ({n_images} images), {len(micro)} micro-batches of {shape['batch']}, "
          f"{useful} useful (label + image) tokens; rows padded to a multiple of {bucket}, "
          f"packed rows <= {shape['max_length']}")
    print(f"{'':8} {'rows':>6} {'tokens':>8} {'useful %':>9} {'s/epoch':>9} {'useful tok/s':>13}")
    rate = {}
    for mode, bs in batches.items():
        rows = sum(b["input_ids"].shape[0] for b in bs)
        tokens = sum(b["input_ids"].numel() for b in bs)
        t = statistics.median(times[mode])
        rate[mode] = useful / t
        print(f"{mode:8} {rows:>6} {tokens:>8} {100 * useful / tokens:>8.1f}% {t:>9.3f} {rate[mode]:>13.0f}")
    print(f"packed / padded: {rate['packed'] / rate['padded']:.2f}x useful tokens per second")
    extra = (f"compiled graphs: {graphs_after_warmup} after warm-up, "
             f"{counters['stats']['unique_graphs']} after all rounds")
    if device.type == "cuda":
        extra += f"; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    print(extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
