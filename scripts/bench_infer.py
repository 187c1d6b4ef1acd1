"""Inference cost of a merged VoRA model vs its base LLM, side by side in one run.

    python scripts/bench_infer.py [--device cpu|cuda] [--dtype float32|bfloat16] [--hidden 768] [--layers 10]
                                  [--image-size 224] [--text-tokens 32] [--new-tokens 64] [--reps 7] [--attn sdpa]

Builds a synthetic base LLM (Qwen2 architecture, ~110 M parameters by default), a VoRA training checkpoint
on it (LoRA + patch embedding), merges it with vora-merge and loads both models. The merged model's prompt
is one image (image-size² pixels → (image-size/14)² image tokens) plus text; the base LLM's prompt has the
same number of text tokens. For each repetition (models interleaved, order alternating) it measures

- prefill: time from calling greedy ``generate`` to its first token (prompt forward that fills the KV
  cache, plus the first sampling step), median over repetitions;
- decode: the time of each later cached step (a stopping criterion timestamps every step), median over
  all steps of all repetitions — robust to bursts of load from other processes;

and prints the medians and the merged/base speed ratios (goal: decode ≥ 0.98× the base's tokens/s).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(work: Path, args):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from merge_tools.merge import merge
    from tests.helpers_data import build_tokenizer
    from vora import VoRAForCausalLM
    from vora.checkpoint import save_trainable
    from vora.lora import add_lora
    from vora.model.image_processing_vora import VoRAImageProcessor
    from vora.model.processing_vora import VoRAProcessor

    base = work / "base"
    tok = build_tokenizer(str(base), "chatml", with_image_token=True)
    cfg = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(cfg)
    llm.save_pretrained(base)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    model = VoRAForCausalLM.from_llm(llm, image_token_id=image_token_id, patch_size=14, vision_embed_dim=256,
                                     position_grid=32)
    add_lora(model, num_layers=max(1, args.layers * 3 // 4), rank=64)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    processor = VoRAProcessor(image_processor=VoRAImageProcessor(patch_size=14, min_pixels=56 * 56,
                                                                 max_pixels=448 * 448), tokenizer=tok)
    save_trainable(model, work / "checkpoint", base_llm=str(base), processor=processor)
    del model, llm
    merge(work / "checkpoint", work / "merged", dtype="float32", log=lambda m: None)
    return base, work / "merged"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: with other processes on the cores, multi-threaded "
                        "timings swing by several x; 0 = torch's default)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor, StoppingCriteria, StoppingCriteriaList

    import vora  # noqa: F401
    from vora.generate import device_problem

    if problem := device_problem(args.device):
        p.error(f"--device {problem}")

    if args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    default_dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vora_bench_infer_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base_dir, merged_dir = build(work, args)
        kw = dict(dtype=dtype, attn_implementation=args.attn)
        models = {
            "base": AutoModelForCausalLM.from_pretrained(base_dir, **kw).to(args.device).eval(),
            "merged": AutoModelForCausalLM.from_pretrained(merged_dir, **kw).to(args.device).eval(),
        }
        processor = AutoProcessor.from_pretrained(merged_dir)
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8))
        text = "<image>\n" + " ".join(["red green blue"] * args.text_tokens)
        merged_in = processor(images=[image] * args.batch, text=[text] * args.batch, return_tensors="pt")
        # trim the text so that the prompt has (image tokens + text_tokens) tokens
        n_img = int(merged_in["image_grid_hw"][0].prod())
        L = n_img + args.text_tokens
        merged_in["input_ids"] = merged_in["input_ids"][:, :L]
        merged_in["attention_mask"] = merged_in["attention_mask"][:, :L]
        merged_in = {k: v.to(args.device) for k, v in merged_in.items()}
        merged_in["pixel_values"] = merged_in["pixel_values"].to(dtype)
        g = torch.Generator().manual_seed(0)
        base_ids = torch.randint(10, 400, (args.batch, L), generator=g)
        base_in = {"input_ids": base_ids.to(args.device), "attention_mask": torch.ones_like(base_ids).to(args.device)}
        inputs = {"base": base_in, "merged": merged_in}
        n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}

        def sync():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        class StepClock(StoppingCriteria):
            """Called by generate() once per generated token: timestamps every step, never stops."""

            def __init__(self):
                self.stamps = []

            def __call__(self, input_ids, scores, **kwargs):
                sync()
                self.stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        def run(name, n):
            clock = StepClock()
            sync()
            t0 = time.perf_counter()
            out = models[name].generate(**inputs[name], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        stopping_criteria=StoppingCriteriaList([clock]))
            assert out.shape[1] == L + n, out.shape
            steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
            return clock.stamps[0] - t0, steps

        results = {k: {"ttft": [], "steps": []} for k in models}
        with torch.inference_mode():
            for name in models:  # warm-up
                run(name, 4)
            for rep in range(args.reps):
                order = ["base", "merged"] if rep % 2 == 0 else ["merged", "base"]
                for name in order:
                    ttft, steps = run(name, args.new_tokens)
                    results[name]["ttft"].append(ttft)
                    results[name]["steps"].extend(steps)
        summary = {}
        for name, r in results.items():
            summary[name] = {
                "prefill_ms": statistics.median(r["ttft"]) * 1e3,
                "decode_tok_s": args.batch / statistics.median(r["steps"]),
            }
        print(f"device {args.device}, dtype {str(dtype).removeprefix('torch.')}, attention {args.attn}, "
              f"torch threads {torch.get_num_threads()}")
        print(f"base LLM: {n_params['base'] / 1e6:.1f} M parameters; merged VoRA: {n_params['merged'] / 1e6:.1f} M "
              f"(+{(n_params['merged'] - n_params['base']) / 1e6:.2f} M patch embedding)")
        print(f"prompt: {L} tokens per row ({n_img} image tokens + {args.text_tokens} text for the merged model; "
              f"{L} text tokens for the base), "
              f"batch {args.batch}, {args.new_tokens} new tokens, {args.reps} interleaved repetitions (medians)")
        for name in ("base", "merged"):
            s = summary[name]
            print(f"  {name:7s} prefill {s['prefill_ms']:8.2f} ms   decode {s['decode_tok_s']:8.1f} tokens/s")
        pr = summary["base"]["prefill_ms"] / summary["merged"]["prefill_ms"]
        dr = summary["merged"]["decode_tok_s"] / summary["base"]["decode_tok_s"]
        print(f"ratios merged/base: prefill speed {pr:.3f}x, decode speed {dr:.3f}x (goal ≥ 0.98x)")
        print(json.dumps({"prefill_speed_ratio": round(pr, 4), "decode_speed_ratio": round(dr, 4),
                          **{f"{k}_{m}": round(v, 3) for k, s in summary.items() for m, v in s.items()}}))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
