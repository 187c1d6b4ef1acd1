"""Time a VoRA training step against the plain causal LoRA step it should cost about the same as.

    python scripts/bench_train.py --shape tiny                       # CPU, seconds
    python scripts/bench_train.py --shape cpu                        # CPU, a couple of minutes on 2 cores
    python scripts/bench_train.py --shape S                          # GPU: Qwen2.5-0.5B shape, CLIP-L/14-336
    python scripts/bench_train.py --shape M                          # GPU: Qwen2.5-7B shape, AIMv2-H-like, bs 1 and 2

Models are built from configs with random weights (nothing is downloaded), saved with `save_pretrained` to a
temporary directory and loaded through the code users run (`VoRAForCausalLM.from_llm`, `Teacher.from_pretrained`,
`add_lora`, `VoRACollator`, `VoRAForTraining`). In one process it times

  (a) the VoRA step: patch embedding + VoRA mask + LLM with LoRA + teacher + distillation + LM loss, backward,
      AdamW step;
  (b) the limit proxy: the same LLM + LoRA on the same number of tokens (images replaced by text tokens without
      labels), plain causal attention, no teacher, no distillation, same LM loss,

over --steps steps after --warmup (median), and prints ms/step, tokens/s, images/s, peak memory, MFU, the
ratio (a)/(b) and a per-phase breakdown (CUDA events on GPU; perf_counter on CPU, where nothing is asynchronous).

FLOP model (per step, T tokens, N label tokens, I image tokens, sequences of length L):
  frozen base linears (q,k,v,o,gate,up,down): forward + input gradient = 4 · P_base · T (no weight gradient);
  LoRA: forward + both gradients = 6 · P_lora · T;  attention: 3 × 4 · L² · d_attn per layer and sequence
  (full L², no causal discount); lm_head (frozen): 4 · V · H · N (only label positions are required);
  patch embedding, heads (trainable): 6 · P · I; teacher (frozen, forward only): 2 · P_teacher · I_t + its
  attention. MFU = model FLOPs / step time / --peak-tflops (default: the GPU's dense bf16 peak when known).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vora import VoRAForCausalLM  # noqa: E402
from vora import distill as vdistill  # noqa: E402
from vora.build import enable_activation_checkpointing, flex_training_problem  # noqa: E402
from vora.collator import VoRACollator  # noqa: E402
from vora.distill import VoRAForTraining, default_layer_map  # noqa: E402
from vora.generate import device_problem  # noqa: E402
from vora.lora import add_lora  # noqa: E402
from vora.model import modeling_vora  # noqa: E402
from vora.teacher import Teacher  # noqa: E402


@dataclass
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tie: bool
    lora_rank: int
    lora_layers: int
    teacher: str  # "clip" | "aimv2"
    t_layers: int
    t_width: int
    t_heads: int
    t_ffn: int
    image: int  # square image side in pixels, teacher input size too
    patch: int
    text: int  # text tokens per sample (8 prompt tokens without labels, the rest labelled)
    batches: tuple[int, ...]
    checkpointing: bool
    gpu_only: bool = False


SHAPES = {
    "tiny": Shape(2, 64, 4, 2, 128, 512, False, 8, 2, "clip", 2, 32, 2, 64, 56, 14, 32, (2,), False),
    "cpu": Shape(4, 256, 4, 2, 704, 32000, True, 32, 4, "clip", 4, 192, 4, 384, 112, 14, 128, (2,), False),
    "S": Shape(24, 896, 14, 2, 4864, 151936, True, 512, 24, "clip", 24, 1024, 16, 4096, 336, 14, 256, (8,), False),
    "M": Shape(28, 3584, 28, 4, 18944, 152064, False, 1024, 24, "aimv2", 24, 1536, 12, 4096, 448, 14, 300, (1, 2),
               True, gpu_only=True),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
PHASES = ["mask", "teacher", "LLM forward", "distillation", "loss", "backward", "optimizer"]


# --------------------------------------------------------------------------------------------- building
def build_models(shape: Shape, root: str, device, dtype, attn: str | None, chunked_ce: bool, checkpointing: bool):
    from transformers import AutoModelForCausalLM, Qwen2Config

    image_token_id = shape.vocab - 1  # a real row: VoRA never looks it up, but keeps the LLM's vocabulary
    cfg = Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tie,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    # Random weights, created where they will run (a 7B model is built on the GPU in bf16, never on the CPU).
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    llm.save_pretrained(os.path.join(root, "llm"))
    del llm
    teacher_dir = save_teacher(shape, os.path.join(root, "teacher"), device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    vora = VoRAForCausalLM.from_llm(
        os.path.join(root, "llm"), image_token_id=image_token_id, dtype=dtype, attn_implementation=attn,
        patch_size=shape.patch, vision_embed_dim=shape.t_width, position_grid=shape.image // shape.patch,
    )
    add_lora(vora, num_layers=shape.lora_layers, rank=shape.lora_rank)
    if checkpointing:
        enable_activation_checkpointing(vora, {"use_reentrant": False})
        vora.config.use_cache = False
    pairs = default_layer_map(min(shape.lora_layers, shape.layers), shape.t_layers)
    teacher = Teacher.from_pretrained(teacher_dir, blocks=sorted({t for _, t in pairs}), dtype=dtype)
    with open(os.path.join(teacher_dir, "preprocessor_config.json")) as f:
        pp = json.load(f)
        mean, std = pp["image_mean"], pp["image_std"]
    model = VoRAForTraining(vora, teacher, pairs, weight=1.0, image_mean=mean, image_std=std, chunked_ce=chunked_ce)
    model.distill_heads.requires_grad_(True)
    model.to(device)
    baseline = VoRAForTraining(vora, None, chunked_ce=chunked_ce)  # same LLM + LoRA, no teacher, no heads
    return model.train(), baseline.train(), image_token_id


def save_teacher(shape: Shape, path: str, device, dtype) -> str:
    from transformers import Aimv2VisionConfig, Aimv2VisionModel, CLIPVisionConfig, CLIPVisionModel

    common = dict(hidden_size=shape.t_width, intermediate_size=shape.t_ffn, num_hidden_layers=shape.t_layers,
                  num_attention_heads=shape.t_heads, image_size=shape.image, patch_size=shape.patch)
    with torch.device(device):
        if shape.teacher == "aimv2":
            model = Aimv2VisionModel(Aimv2VisionConfig(**common)).to(dtype)
        else:
            model = CLIPVisionModel(CLIPVisionConfig(**common)).to(dtype)
    model.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
        json.dump({"image_mean": clip_mean, "image_std": clip_std}, f)
    return path


def make_samples(shape: Shape, batch: int, image_token_id: int, with_images: bool, seed: int = 0):
    """One image + `shape.text` text tokens per sample: 8 prompt tokens, the image, the rest labelled."""
    g = torch.Generator().manual_seed(seed)
    grid = shape.image // shape.patch
    n_img = grid * grid
    samples = []
    for _ in range(batch):
        prompt = torch.randint(3, image_token_id, (8,), generator=g)
        answer = torch.randint(3, image_token_id, (shape.text - 8,), generator=g)
        if with_images:
            image = torch.full((n_img,), image_token_id)
            pixels = torch.randn(n_img, 3 * shape.patch**2, generator=g)
            extra = {"pixel_values": pixels, "image_grid_hw": torch.tensor([[grid, grid]])}
        else:  # the limit proxy: the same number of tokens, all text, the image's positions without labels
            image = torch.randint(3, image_token_id, (n_img,), generator=g)
            extra = {}
        ids = torch.cat([prompt, image, answer])
        labels = torch.cat([torch.full((8 + n_img,), -100), answer])
        samples.append({"input_ids": ids, "labels": labels, **extra})
    return samples


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- timing
class Clock:
    """Intervals on the device timeline: CUDA events on GPU (no host sync inside a step), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks: dict[str, list] = {}

    def now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    @contextmanager
    def phase(self, name):
        start = self.now()
        try:
            yield
        finally:
            self.marks.setdefault(name, []).append((start, self.now()))

    def collect(self) -> dict[str, float]:
        """Milliseconds per phase name, summed over this step's intervals; clears the marks."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for name, spans in self.marks.items():
            out[name] = sum(a.elapsed_time(b) if self.cuda else (b - a) * 1e3 for a, b in spans)
        self.marks = {}
        return out


def instrument(clock: Clock, model: VoRAForTraining):
    """Wrap the step's parts (mask building, teacher, LLM forward, LM loss) in clock phases; returns an undo."""
    undo = []

    def wrap(owner, name, label):
        original = getattr(owner, name)
        own = name in vars(owner)  # a module's function (put back) or a method seen through the class (deleted)

        def timed(*args, **kwargs):
            with clock.phase(label):
                return original(*args, **kwargs)

        setattr(owner, name, timed)
        undo.append(lambda: setattr(owner, name, original) if own else delattr(owner, name))

    wrap(modeling_vora, "build_attention_masks", "mask")
    wrap(modeling_vora, "image_block_ids", "mask")
    wrap(vdistill, "chunked_lm_loss", "loss")
    wrap(model.vora, "forward", "llm")
    wrap(model.vora, "last_hidden_state", "llm")
    if model.teacher is not None:
        wrap(model.teacher, "features_for", "teacher")

    def restore():
        for f in reversed(undo):
            f()

    return restore


class RssPeak:
    """CPU memory: peak resident set size during the steps above the level before them. The kernel's own peak
    (VmHWM, reset through /proc/self/clear_refs) where allowed, else sampled every 2 ms (may miss short peaks)."""

    def __init__(self):
        self.base = self._status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.kernel = True
        except OSError:
            self.kernel = False
            self.peak = self.base
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    @staticmethod
    def _status(key) -> int:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self._status("VmRSS"))
            time.sleep(0.002)

    def result(self) -> int:
        if self.kernel:
            return self._status("VmHWM") - self.base
        self.stop.set()
        self.thread.join()
        return self.peak - self.base


def run_steps(model, batch, device, steps, warmup, lr=1e-5):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")
    clock = Clock(device)
    restore = instrument(clock, model)
    totals, phases = [], []
    try:
        for i in range(warmup + steps):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    mem = None
                else:
                    mem = RssPeak()
            start = clock.now()
            with clock.phase("forward"):
                out = model(**batch)
            with clock.phase("backward"):
                out.loss.backward()
            with clock.phase("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
            end = clock.now()
            clock.marks["step"] = [(start, end)]
            ms = clock.collect()
            if i >= warmup:
                totals.append(ms["step"])
                phases.append(ms)
    finally:
        restore()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else mem.result()
    del opt
    breakdown = {}
    for name in PHASES:
        key = {"LLM forward": "llm"}.get(name, name)
        vals = []
        for ms in phases:
            if name == "distillation":  # what the forward spends outside teacher, LLM and loss: heads + block losses
                v = ms["forward"] - ms.get("teacher", 0) - ms.get("llm", 0) - ms.get("loss", 0)
            elif name == "LLM forward":  # mask building is inside the LLM forward call: reported on its own
                v = ms.get("llm", 0) - ms.get("mask", 0)
            else:
                v = ms.get(key)
            vals.append(v)
        breakdown[name] = None if any(v is None for v in vals) else statistics.median(vals)
    return statistics.median(totals), peak, breakdown


# --------------------------------------------------------------------------------------------- FLOPs
def step_flops(shape: Shape, batch: dict, image_token_id: int, with_teacher: bool) -> float:
    H, V = shape.hidden, shape.vocab
    d_attn = shape.heads * (H // shape.heads)
    kv = shape.kv_heads * (H // shape.heads)
    per_layer = H * d_attn + 2 * H * kv + d_attn * H + 3 * H * shape.ffn
    mask = batch["attention_mask"]
    T = int((mask > 0).sum())
    N = batch["num_label_tokens"]
    flops = 4 * per_layer * shape.layers * T
    lora_in_out = [(H, d_attn), (H, kv), (H, kv), (d_attn, H), (H, shape.ffn), (H, shape.ffn), (shape.ffn, H)]
    p_lora = sum(shape.lora_rank * (i + o) for i, o in lora_in_out) * shape.lora_layers
    flops += 6 * p_lora * T
    seq_lens = []
    for row in mask:
        for seg in row.unique():
            if seg > 0:
                seq_lens.append(int((row == seg).sum()))
    flops += 3 * sum(4 * L * L * d_attn for L in seq_lens) * shape.layers
    flops += 4 * V * H * N
    if with_teacher:
        n_image_tokens = int((batch["input_ids"] == image_token_id).sum())
        n_images = len(batch.get("image_grid_list") or ())
        D, T_ = shape.t_width, shape.t_layers
        t_tok = (shape.image // shape.patch) ** 2
        flops += 2 * (4 * D * D + 2 * D * shape.t_ffn) * T_ * t_tok * n_images + 4 * t_tok * t_tok * D * T_ * n_images
        p_embed = 3 * shape.patch**2 * D + D * H
        p_heads = (H * D) * min(shape.lora_layers, shape.layers)
        flops += 6 * (p_embed + p_heads) * n_image_tokens
    return float(flops)


def peak_tflops(device, given):
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# --------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                    help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--attn-implementation", default="sdpa",
                    help="passed to from_llm (eager, sdpa, flex_attention, …)")
    ap.add_argument("--packing", action=argparse.BooleanOptionalAction, default=False,
                    help="collator packing (row capacity: two samples)")
    ap.add_argument("--chunked-ce", action=argparse.BooleanOptionalAction, default=True,
                    help="LM loss at label positions only (model.chunked_ce)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="default: the shape's (on for M)")
    ap.add_argument("--batch", type=int, action="append", help="micro-batch size(s) (default: the shape's)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median; at least 10)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: known GPUs' dense bf16 peak)")
    args = ap.parse_args(argv)
    if args.steps < 10:
        ap.error("--steps: at least 10 (the median of fewer is noise)")
    shape = SHAPES[args.shape]
    if problem := device_problem(args.device):
        ap.error(f"--device {problem}")
    device = torch.device(args.device)
    if shape.gpu_only and device.type != "cuda":
        ap.error(f"--shape {args.shape}: a 7B model is built directly on the GPU; run it with --device cuda")
    if args.attn_implementation == "flex_attention" and (problem := flex_training_problem(device)):
        ap.error(f"--attn-implementation: {problem}: --attn-implementation sdpa")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    ckpt = shape.checkpointing if args.gradient_checkpointing is None else args.gradient_checkpointing
    batches = tuple(args.batch or shape.batches)
    torch.manual_seed(0)

    print(f"bench_train: shape {args.shape}, device {device_name(device)}, {dtype}, torch {torch.__version__}, "
          f"attn {args.attn_implementation}, packing {'on' if args.packing else 'off'}, "
          f"chunked CE {'on' if args.chunked_ce else 'off'}, gradient checkpointing {'on' if ckpt else 'off'}, "
          f"{args.steps} timed steps after {args.warmup} warm-up (median)")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as root:
        model, baseline, image_token_id = build_models(shape, root, device, dtype, args.attn_implementation,
                                                       args.chunked_ce, ckpt)
    peak = peak_tflops(device, args.peak_tflops)
    sample_len = 8 + (shape.image // shape.patch) ** 2 + shape.text - 8
    collator = VoRACollator(0, max_length=2 * sample_len if args.packing else None, packing=args.packing,
                            patch_size=shape.patch, image_token_id=image_token_id)
    for b in batches:
        rows, breakdowns = [], []
        for label, m, with_images in (("VoRA step (a)", model, True), ("plain causal LoRA (b)", baseline, False)):
            batch = collator(make_samples(shape, b, image_token_id, with_images))
            flops = step_flops(shape, batch, image_token_id, with_teacher=with_images)
            tokens = int((batch["attention_mask"] > 0).sum())
            n_images = len(batch.get("image_grid_list") or ())
            ms, mem, phases = run_steps(m, to_device(batch, device), device, args.steps, args.warmup)
            mfu = f"{100 * flops / (ms / 1e3) / (peak * 1e12):.1f} %" if peak else "n/a"
            rows.append([label, b, f"{ms:.1f}", f"{tokens / ms * 1e3:,.0f}", f"{n_images / ms * 1e3:.2f}",
                         f"{mem / 2**20:,.0f} MiB", f"{flops / 1e9:,.1f}", mfu])
            breakdowns.append(phases)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ratio = float(rows[0][2]) / float(rows[1][2])
        mem_label = "peak memory" if device.type == "cuda" else "peak RSS +"
        print()
        table(["run", "batch", "ms/step", "tokens/s", "images/s", mem_label, "GFLOP/step", "MFU"], rows)
        print(f"ratio (a)/(b): {ratio:.2f}x at batch {b}")
        print()
        table(["phase (ms, median)", "(a) VoRA", "(b) plain"],
              [[name] + [fmt(bd[name]) for bd in breakdowns] for name in PHASES])
        if not args.chunked_ce:
            print("(loss is inside 'LLM forward' without --chunked-ce: transformers computes it there)")
    if peak is None:
        print("MFU: n/a (unknown peak; pass --peak-tflops)")
    else:
        print(f"MFU against {peak:.0f} TFLOP/s")


def fmt(v):
    return "-" if v is None else f"{v:.1f}"


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()
