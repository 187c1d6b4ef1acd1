"""Serving throughput of a merged VoRA model under vLLM vs the same LLM without images vs transformers.generate.

    python scripts/bench_serve.py [--shape qwen2.5-0.5b|tiny] [--prompts 64] [--image-size 448] [--text-tokens 64]
                                  [--new-tokens 128] [--dtype bfloat16] [--skip-vllm] [--skip-hf] [--workdir DIR]

Needs a GPU and vLLM (README "Serve") except with ``--shape tiny --skip-vllm`` (a CPU smoke run of the rest).
Builds, with random weights, a Qwen2.5-0.5B-shaped LLM and a VoRA model around it (patch 14; a 448² image is
1024 tokens), saved as vora-merge's output (``merge_tools.merge.complete_full_model``), and the bare LLM. Three
engines, each in its own process, on ``--prompts`` prompts:

- ``vllm vora``: one image + ``--text-tokens`` text tokens per prompt (image-bidirectional prefill);
- ``vllm base``: the bare LLM with the same number of text tokens (1024 + text) — the target is VoRA ≥ 0.9× this;
- ``hf vora``: ``transformers.generate`` on the merged model, the prompts in batches of ``--hf-batch``.

For each: prefill = wall time of the whole set with 1 new token (prompt tokens/s); decode = (time with
``--new-tokens`` − prefill time) for the remaining tokens (generated tokens/s); TTFT = one prompt alone, 1 new
token, median of 5. Outputs are forced to full length (EOS ignored). Prints a side-by-side table and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # Qwen2.5-0.5B: 24 layers, width 896, 14 heads (2 KV heads), MLP 4864, vocabulary 151936, tied embeddings.
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1024, tie_word_embeddings=True),
}


def build(work: Path, shape: str, dtype: str) -> tuple[Path, Path, int]:
    """(merged VoRA dir, bare LLM dir, image token id)."""
    import torch
    from transformers import Qwen2Config

    from merge_tools.merge import complete_full_model
    from tests.helpers_data import build_tokenizer
    from vora import VoRAConfig, VoRAForCausalLM
    from vora.model.image_processing_vora import VoRAImageProcessor
    from vora.model.processing_vora import VoRAProcessor

    merged, base = work / "vora", work / "base"
    tok = build_tokenizer(str(work / "tok"), "chatml", with_image_token=True)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    text = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = VoRAConfig(text_config=text, image_token_id=image_token_id, patch_size=14, vision_embed_dim=1024,
                        position_grid=32)
    torch.manual_seed(0)
    model = VoRAForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(merged)
    ip = VoRAImageProcessor(patch_size=14, max_pixels=448 * 448)
    complete_full_model(merged, config, VoRAProcessor(image_processor=ip, tokenizer=tok))
    model.language_model.save_pretrained(base)
    tok.save_pretrained(base)
    return merged, base, image_token_id


def prompts(n: int, text_tokens: int, image_size: int, image_token_id: int, vocab_lo: int = 20, vocab_hi: int = 380):
    """Random text ids (inside the tiny tokenizer's ordinary tokens) and one noise image per prompt."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    texts = [rng.integers(vocab_lo, vocab_hi, text_tokens).tolist() for _ in range(n)]
    images = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)) for _ in range(n)]
    return texts, images


# ------------------------------------------------------------------------------------------------
# engines (each run in its own process: one vLLM engine per process)
# ------------------------------------------------------------------------------------------------
def run_vllm(args, model_dir: str, with_images: bool, image_token_id: int, n_image_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    texts, images = prompts(args.prompts, args.text_tokens, args.image_size, image_token_id)
    if with_images:
        reqs = [{"prompt_token_ids": [image_token_id] + t, "multi_modal_data": {"image": im}}
                for t, im in zip(texts, images)]
    else:  # the same number of prompt tokens, all text
        filler = prompts(args.prompts, n_image_tokens, args.image_size, image_token_id)[0]
        reqs = [{"prompt_token_ids": f + t} for f, t in zip(filler, texts)]
    llm = LLM(model=model_dir, dtype=args.dtype, max_model_len=4096, gpu_memory_utilization=0.5, seed=0,
              limit_mm_per_prompt={"image": 1} if with_images else None)

    def timed(reqs, n_new):
        params = SamplingParams(max_tokens=n_new, min_tokens=n_new, ignore_eos=True, temperature=0.0)
        t = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        return time.perf_counter() - t, outs

    timed(reqs[:4], 2)  # warm-up (compilation, CUDA graphs)
    t_prefill, outs = timed(reqs, 1)
    n_prompt = sum(len(o.prompt_token_ids) for o in outs)
    t_full, _ = timed(reqs, args.new_tokens)
    ttft = statistics.median(timed(reqs[:1], 1)[0] for _ in range(5))
    return result(n_prompt, t_prefill, t_full, ttft, args)


def run_hf(args, model_dir: str, image_token_id: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    import vora  # noqa: F401

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa").to(device).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    texts, images = prompts(args.prompts, args.text_tokens, args.image_size, image_token_id)
    def encode(strs, imgs):
        enc = proc(text=strs, images=imgs, padding_side="left", add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        return enc

    strs = ["<image>" + proc.tokenizer.decode(t) for t in texts]
    batches = [encode(strs[s : s + args.hf_batch], images[s : s + args.hf_batch])
               for s in range(0, args.prompts, args.hf_batch)]
    one = encode(strs[:1], images[:1])

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def timed(bs, n_new):
        sync()
        t = time.perf_counter()
        for b in bs:
            model.generate(**b, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                           pad_token_id=proc.tokenizer.pad_token_id)
        sync()
        return time.perf_counter() - t

    timed(batches[:1], 2)
    n_prompt = sum(int(b["attention_mask"].sum()) for b in batches)
    t_prefill = timed(batches, 1)
    t_full = timed(batches, args.new_tokens)
    ttft = statistics.median(timed([one], 1) for _ in range(5))
    return result(n_prompt, t_prefill, t_full, ttft, args)


def result(n_prompt, t_prefill, t_full, ttft, args) -> dict:
    n_decode = args.prompts * (args.new_tokens - 1)
    t_decode = max(t_full - t_prefill, 1e-9)
    return {"prompt_tokens": n_prompt, "prefill_s": t_prefill, "prefill_tok_s": n_prompt / t_prefill,
            "decode_s": t_decode, "decode_tok_s": n_decode / t_decode, "ttft_ms": 1000 * ttft,
            "total_tok_s": (n_prompt + args.prompts * args.new_tokens) / t_full}


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--workdir", default=None)
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # internal: run one engine, print JSON
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--image-token-id", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    n_image_tokens = (args.image_size // 14) ** 2

    if args.engine:
        if args.engine == "hf":
            res = run_hf(args, args.model_dir, args.image_token_id)
        else:
            res = run_vllm(args, args.model_dir, args.engine == "vllm-vora", args.image_token_id, n_image_tokens)
        print("RESULT " + json.dumps(res))
        return 0

    # The machine, before building anything (the engines run in child processes that would fail one by one).
    import importlib.util

    import torch

    if not (args.shape == "tiny" and args.skip_vllm) and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (torch sees none here); a CPU smoke run of the rest: --shape tiny --skip-vllm")
    if not args.skip_vllm and importlib.util.find_spec("vllm") is None:
        p.error(f"vLLM is not installed in {sys.executable} (README \"Serve\"): run this with the vLLM "
                "environment's python, or pass --skip-vllm")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_serve_"))
    t = time.time()
    merged, base, image_token_id = build(work, args.shape, args.dtype)
    print(f"built {args.shape} (random weights) in {time.time() - t:.0f} s: {merged}, {base}")
    runs = []
    if not args.skip_vllm:
        runs += [("vllm vora (image)", "vllm-vora", merged), ("vllm base (text)", "vllm-base", base)]
    if not args.skip_hf:
        runs += [("hf vora (image)", "hf", merged)]
    results = {}
    for label, engine, model_dir in runs:
        cmd = [sys.executable, __file__, "--engine", engine, "--model-dir", str(model_dir),
               "--image-token-id", str(image_token_id)] + [a for a in (argv if argv is not None else sys.argv[1:])]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        # one stream: vLLM logs to stdout, a worker's exception (e.g. the image-mask refusal) included
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{label}: failed (exit {proc.returncode})\n{proc.stdout[-3000:]}")
            continue
        results[label] = json.loads(line[len("RESULT "):])

    cols = [("prompt_tokens", "{:.0f}"), ("prefill_tok_s", "{:.0f}"), ("decode_tok_s", "{:.0f}"),
            ("total_tok_s", "{:.0f}"), ("ttft_ms", "{:.1f}")]
    print(f"\n{args.prompts} prompts, 1 image {args.image_size}² ({n_image_tokens} tokens) + {args.text_tokens} text "
          f"tokens, {args.new_tokens} new tokens, {args.dtype}")
    print(f"{'engine':22s}" + "".join(f"{c:>15s}" for c, _ in cols))
    for label, r in results.items():
        print(f"{label:22s}" + "".join(f"{f.format(r[c]):>15s}" for c, f in cols))
    a, b = results.get("vllm vora (image)"), results.get("vllm base (text)")
    if a and b:
        print(f"\nvLLM VoRA / base (target ≥ 0.9): prefill {a['prefill_tok_s'] / b['prefill_tok_s']:.2f}x, "
              f"decode {a['decode_tok_s'] / b['decode_tok_s']:.2f}x, total {a['total_tok_s'] / b['total_tok_s']:.2f}x, "
              f"TTFT {a['ttft_ms'] / b['ttft_ms']:.2f}x")
    h = results.get("hf vora (image)")
    if a and h:
        print(f"vLLM / transformers.generate on VoRA: prefill {a['prefill_tok_s'] / h['prefill_tok_s']:.2f}x, "
              f"decode {a['decode_tok_s'] / h['decode_tok_s']:.2f}x, total {a['total_tok_s'] / h['total_tok_s']:.2f}x")
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
