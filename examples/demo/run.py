"""The embedded demo: synthetic corpus → stand-in LLM and ViT teacher → VoRA stage 1 through the real
training entry point (the ``deepspeed`` launcher and ``configs/demo_stage1.yaml``) → ``vora-merge`` →
the merged model loaded with transformers' Auto classes answers held-out questions with ``generate``.

    python -m examples.demo [--out demo_out] [--fast] [--no-distill] [--attention causal] [--lora-layers K]
                        [--compare] [--steps N] [--seed S [S ...]] [--threads N]

Several seeds run one after another, each in its own ``seed-S/`` below ``--out``, and the spread across them is
printed. Library warnings (transformers, DeepSpeed) go to ``logs/demo.log`` and the per-stage logs, not to the
console. The last line is the verdict: ``demo: PASS …`` or ``demo: FAIL …`` with the bar.

Exit status: 0 when everything ran and the default configuration met its accuracy bar (on every seed), 1 when
a stage failed, 2 when the default configuration ran but learned less than its bar (an ablation has no bar).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "demo_stage1.yaml"

# Two budgets. "full" is the README's first command (≤ 10 minutes on 2 idle CPU cores: 7.5–9 measured);
# "fast" is what tests/test_demo.py runs (2–2.5 minutes: 126–147 s measured on seeds 0–2, colour 91–99 %).
PRESETS = {
    "full": dict(n_train=6000, n_heldout=300, llm_steps=250, teacher_steps=800, stage1_steps=1200, save_steps=100,
                 curve_questions=160, bars={"colour": 0.90, "shape": 0.90}),
    "fast": dict(n_train=1500, n_heldout=80, llm_steps=150, teacher_steps=120, stage1_steps=120, save_steps=40,
                 curve_questions=96, bars={"colour": 0.60}),
}
CURVE_TARGET = 0.80  # "steps to 80 %": first checkpoint with colour and shape both at or above this
CHANCE = {"colour": 1 / 6, "shape": 1 / 4, "count": 1 / 3, "size": 1 / 2}


@dataclass
class Variant:
    name: str
    label: str
    overrides: list[str] = field(default_factory=list)
    ablation: bool = False


def variant_from_args(args) -> Variant:
    parts, labels, overrides = [], [], []
    if args.no_distill:
        parts.append("no-distill")
        labels.append("--no-distill")
        overrides.append("distill=null")
    if args.attention != "bidirectional":
        parts.append(args.attention)
        labels.append(f"--attention {args.attention}")
        overrides.append(f"model.attention_mode={args.attention}")
    if args.lora_layers is not None:
        parts.append(f"lora-{args.lora_layers}")
        labels.append(f"--lora-layers {args.lora_layers}")
        overrides += lora_overrides(args.lora_layers, distill=not args.no_distill)
    if not parts:
        return Variant("vora", "VoRA (default)")
    return Variant("+".join(parts), " ".join(labels), overrides, ablation=True)


def lora_overrides(k: int, distill: bool = True) -> list[str]:
    # Distillation stays on the LoRA blocks, at most the recipe's 3 (the last block is left free).
    out = [f"lora.layers={k}"]
    if distill:
        out.append(f"distill.num_blocks={min(k, 3)}")
    return out


def compare_variants(k: int | None = None) -> list[Variant]:
    """The default and the two ablations of the method's ideas (distillation, bidirectional attention inside the
    image); with ``k``, also LoRA on the first ``k`` blocks only."""
    variants = [
        Variant("vora", "VoRA (default)"),
        Variant("no-distill", "--no-distill", ["distill=null"], True),
        Variant("causal", "--attention causal", ["model.attention_mode=causal"], True),
    ]
    if k is not None:
        variants.append(Variant(f"lora-{k}", f"--lora-layers {k}", lora_overrides(k), True))
    return variants


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.t0 = time.time()
        self.parts: dict[str, float] = {}

    def lap(self, name: str, since: float) -> float:
        dt = time.time() - since
        self.parts[name] = self.parts.get(name, 0.0) + dt
        return dt

    @property
    def total(self) -> float:
        return time.time() - self.t0


def say(msg: str = "") -> None:
    print(msg, flush=True)


def rel(path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    p = os.path.abspath(str(path))
    r = os.path.relpath(p)
    return p if r.startswith("..") else r


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_tool(name: str) -> str:
    """A console script next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"demo: cannot find the `{name}` command (is vora installed in this environment?)")
    return found


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # OpenMP threads that spin-wait thrash on a busy 2-core box
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class StageError(RuntimeError):
    pass


def run_logged(cmd: list[str], log_path: Path, on_line=None) -> None:
    """Run a command, its output to ``log_path``; raise :class:`StageError` with the log's tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
                                cwd=str(REPO))
        for line in proc.stdout:
            log.write(line)
            if on_line is not None:
                on_line(line)
        rc = proc.wait()
    if rc != 0:
        tail = log_path.read_text().splitlines()[-40:]
        raise StageError(f"`{' '.join(cmd[:6])} …` exited with status {rc}; last lines of {log_path}:\n    "
                         + "\n    ".join(tail))


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------
def prepare(out: Path, preset: dict, seed: int, clock: Clock) -> dict:
    """Corpus + stand-in LLM + stand-in teacher (each reused when already built with the same settings)."""
    from . import corpus as C
    from . import pretrain as P

    t = time.time()
    meta = C.generate(str(out / "corpus"), n_train=preset["n_train"], n_heldout=preset["n_heldout"], seed=seed,
                      log=lambda m: say("  " + m))
    say(f"  ({clock.lap('corpus', t):.0f} s)")
    t = time.time()
    P.pretrain_llm(str(out / "llm"), str(out / "corpus"), steps=preset["llm_steps"], seed=seed,
                   log=lambda m: say("  " + m))
    say(f"  ({clock.lap('stand-in LLM', t):.0f} s)")
    t = time.time()
    P.pretrain_teacher(str(out / "teacher"), str(out / "corpus"), steps=preset["teacher_steps"], seed=seed,
                       log=lambda m: say("  " + m))
    say(f"  ({clock.lap('stand-in teacher', t):.0f} s)")
    return meta


def train_stage1(out: Path, variant: Variant, preset: dict, steps: int, seed: int, clock: Clock) -> Path:
    run_dir = out / "runs" / variant.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [
        venv_tool("deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
        "--module", "vora.train", str(RECIPE),
        f"model.llm={out / 'llm'}",
        f"distill.teacher={out / 'teacher'}",
        f"data.sources.0.path={out / 'corpus' / 'train.jsonl'}",
        f"data.cache_dir={out / 'cache'}",
        f"train.output_dir={run_dir}",
        f"train.max_steps={steps}",
        f"train.save_steps={preset['save_steps']}",
        f"train.seed={seed}",
        *variant.overrides,
    ]
    say("  $ " + " ".join(os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c for c in cmd))
    t = time.time()
    state = {"logs": 0, "last": None}
    logging_steps = 10
    every = max(logging_steps, (steps // 8) // logging_steps * logging_steps)

    def on_line(line: str):
        i = line.find("{'loss'")
        if i < 0:
            return
        try:
            rec = ast.literal_eval(line[i:].strip().split("}")[0] + "}")
        except (ValueError, SyntaxError):
            return
        state["logs"] += 1
        step = state["logs"] * logging_steps
        if step % every == 0 or step == steps:
            distilled = "distill_loss" in rec and "distill=null" not in variant.overrides
            dist = f"  distill {float(rec['distill_loss']):.3f}" if distilled else ""
            lm = float(rec.get("lm_loss", rec["loss"]))
            say(f"  step {step:4d}/{steps}  lm {lm:.3f}{dist}  ({time.time() - t:.0f} s)")

    run_logged(cmd, out / "logs" / f"train_{variant.name}.log", on_line)
    dt = clock.lap(f"stage 1 ({variant.name})", t)
    say(f"  trained in {dt:.0f} s (log: {rel(out / 'logs' / f'train_{variant.name}.log')})")
    return run_dir


def merge(out: Path, run_dir: Path, variant: Variant, clock: Clock) -> Path:
    merged = out / "merged" / variant.name
    cmd = [venv_tool("vora-merge"), str(run_dir / "final"), "--output", str(merged), "--overwrite"]
    say("  $ " + " ".join([Path(cmd[0]).name] + [rel(c) for c in cmd[1:2]] + ["--output", rel(merged), "--overwrite"]))
    t = time.time()
    run_logged(cmd, out / "logs" / f"merge_{variant.name}.log")
    say(f"  ({clock.lap('merge', t):.0f} s)")
    return merged


def evaluate_merged(merged: Path, corpus_dir: Path, clock: Clock):
    """Load the merged directory as any user would (Auto classes, remote code) and answer every held-out
    question."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    from . import evaluate as E

    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(merged), trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(merged), trust_remote_code=True)
    rows = E.load_heldout(str(corpus_dir))
    acc, answers = E.evaluate(model, processor, str(corpus_dir), rows)
    say(f"  evaluated in {clock.lap('evaluation', t):.0f} s")
    return acc, rows, answers, f"{type(model).__module__}.{type(model).__name__}"


def learning_curve(run_dir: Path, corpus_dir: Path, n_questions: int, clock: Clock) -> list[dict]:
    """Held-out accuracy of each saved checkpoint (LoRA not merged: the checkpoint as the trainer wrote it)
    on a fixed subset of the held-out questions."""
    import torch

    from vora.checkpoint import load_trainable
    from vora.model.processing_vora import VoRAProcessor

    from . import evaluate as E

    t = time.time()
    rows = E.load_heldout(str(corpus_dir), limit=n_questions, seed=1)
    points = []
    ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    for ckpt in ckpts:
        model, _ = load_trainable(ckpt, dtype=torch.float32)
        processor = VoRAProcessor.from_pretrained(str(ckpt))
        acc, _ = E.evaluate(model, processor, str(corpus_dir), rows)
        points.append({"step": int(ckpt.name.split("-")[-1]), **acc})
    say(f"  {len(points)} checkpoints evaluated in {clock.lap('learning curve', t):.0f} s")
    return points


def steps_to(points: list[dict], target: float = CURVE_TARGET) -> int | None:
    for p in points:
        if p.get("colour", 0) >= target and p.get("shape", 0) >= target:
            return p["step"]
    return None


def final_losses(run_dir: Path, last: int = 5) -> dict:
    """Mean of the last ``last`` logged values (the last ``last × logging_steps`` steps) of each loss."""
    with open(run_dir / "trainer_state.json") as f:
        history = json.load(f)["log_history"]
    out = {}
    for key in ("lm_loss", "distill_loss"):
        vals = [float(h[key]) for h in history if key in h]
        out[key] = sum(vals[-last:]) / len(vals[-last:]) if vals else None
    return out


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
ATTRS = ("colour", "shape", "count", "size")


def pct(x) -> str:
    return "   —  " if x is None else f"{100 * x:5.1f} %"


def print_accuracy(acc: dict, rows: list[dict], bars: dict | None) -> None:
    counts = {a: sum(r["attribute"] == a for r in rows) for a in ATTRS}
    say(f"  {'attribute':<10} {'accuracy':>9} {'questions':>10} {'chance':>8} {'bar':>8}")
    for a in ATTRS:
        bar = f"≥ {100 * bars[a]:.0f} %" if bars and a in bars else ""
        say(f"  {a:<10} {pct(acc.get(a)):>9} {counts[a]:>10} {100 * CHANCE[a]:>6.0f} % {bar:>8}")
    say(f"  {'all':<10} {pct(acc.get('all')):>9} {len(rows):>10}")


def print_samples(rows, answers, n: int = 8, n_wrong: int = 3, seed: int = 0) -> None:
    """A random sample of answers next to the truth, then a few of the mistakes (if any)."""
    from .evaluate import first_word

    rng = random.Random(seed)
    idx = rng.sample(range(len(rows)), min(n, len(rows)))
    wrong = [i for i in range(len(rows)) if first_word(answers[i]) != rows[i]["answer"] and i not in idx]
    idx += rng.sample(wrong, min(n_wrong, len(wrong)))
    say(f"  {'image':<28} {'question':<32} {'answer':<10} {'truth':<10}")
    for k, i in enumerate(idx):
        if k == n:
            say("  … and some of the mistakes:")
        r, a = rows[i], answers[i]
        mark = "✓" if first_word(a) == r["answer"] else "✗"
        say(f"  {r['image']:<28} {r['question'][:32]:<32} {a[:10]:<10} {r['answer']:<10} {mark}")


def check_bars(acc: dict, bars: dict) -> list[str]:
    return [f"{a} {100 * acc.get(a, 0):.1f} % < {100 * b:.0f} %" for a, b in bars.items() if acc.get(a, 0) < b]


def print_compare(results: list[dict]) -> str:
    """One row per result (a variant, or a variant and a seed: then labelled "… seed S"); with several seeds of a
    variant, a row with the spread (min–max) of its accuracies follows its seeds."""
    head = (f"{'variant':<26}" + "".join(f"{a:>8}" for a in ATTRS)
            + f"{'all':>8}{'LM loss':>9}{'distill':>9}{'→80 %':>8}{'train':>8}")
    lines = [head, "-" * len(head)]
    by_label: dict[str, list[dict]] = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    for label, group in by_label.items():
        for r in group:
            acc = r["accuracy"]
            lm, dl = r["final_losses"].get("lm_loss"), r["final_losses"].get("distill_loss")
            s80 = r["steps_to_80"]
            name = label + (f" seed {r['seed']}" if len(group) > 1 else "")
            lines.append(
                f"{name:<26}" + "".join(f"{100 * acc.get(a, 0):7.1f}%" for a in ATTRS)
                + f"{100 * acc.get('all', 0):7.1f}%"
                + (f"{lm:9.3f}" if lm is not None else f"{'—':>9}") + (f"{dl:9.3f}" if dl is not None else f"{'—':>9}")
                + (f"{s80:>8}" if s80 is not None else f"{'> ' + str(r['steps']):>8}") + f"{r['train_seconds']:7.0f}s"
            )
        if len(group) > 1:
            lines.append(f"{'  spread (min–max)':<26}" + "".join(f"{spread(group, a):>8}" for a in (*ATTRS, "all")))
    text = "\n".join(lines)
    say(text)
    return text


def compare_caption(results: list[dict], seeds: list[int], steps: int, preset: dict) -> str:
    """The line above the --compare table: what was compared and how each column was measured."""
    counts = sorted({r["heldout_questions"] for r in results})  # each seed draws its own held-out questions
    heldout = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return (f"[compare] same recipe and {steps} steps"
            + (f", seeds {' '.join(map(str, seeds))} (each its own corpus, stand-ins and training)" if len(seeds) > 1
               else ", same corpus and stand-ins")
            + f"; accuracy of the merged models on all {heldout} held-out questions (of their seed); "
            f"losses: mean of the last 50 steps; →80 %: first checkpoint (every {preset['save_steps']} steps, "
            f"{preset['curve_questions']} held-out questions) with colour and shape ≥ 80 %")


def spread(results: list[dict], attribute: str) -> str:
    """Accuracy range across seeds in points, e.g. "93–96" (rounded down / up to whole points)."""
    vals = [100 * r["accuracy"].get(attribute, 0) for r in results]
    return f"{math.floor(min(vals))}–{math.ceil(max(vals))}"


def verdict(results: list[dict], bars: dict) -> tuple[bool, str]:
    """The one-line verdict on the default configuration's runs (one per seed)."""
    ok = not any(r["failed_bars"] for r in results)
    seeds = [r.get("seed") for r in results]
    where = f"seed {seeds[0]}" if len(results) == 1 else f"seeds {' '.join(map(str, seeds))}, worst seed"
    parts = []
    for a, b in bars.items():
        worst = min(r["accuracy"].get(a, 0) for r in results)
        parts.append(f"{a} {100 * worst:.1f} % {'≥' if worst >= b else '<'} {100 * b:.0f} %")
    return ok, f"demo: {'PASS' if ok else 'FAIL'} — default configuration ({where}): " + ", ".join(parts)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def fingerprint(out: Path, variant: Variant, preset: dict, steps: int, seed: int) -> str:
    """What a finished run depends on: the recipe, the variant, the budget, the seed and the stand-ins."""
    import hashlib

    h = hashlib.sha256()
    h.update(RECIPE.read_bytes())
    h.update(json.dumps([variant.overrides, preset, steps, seed], sort_keys=True).encode())
    for f in (out / "corpus" / "meta.json", out / "llm" / "demo_settings.json", out / "teacher" / "demo_settings.json"):
        h.update(f.read_bytes() if f.exists() else b"-")
    return h.hexdigest()[:16]


def reusable(out: Path, variant: Variant, fp: str) -> dict | None:
    path = out / "results" / f"{variant.name}.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result.get("fingerprint") != fp or not Path(result.get("merged", "")).is_dir():
        return None
    return result


def run_variant(out: Path, variant: Variant, preset: dict, steps: int, seed: int, clock: Clock, samples: bool,
                reuse: bool = False) -> dict:
    corpus_dir = out / "corpus"
    fp = fingerprint(out, variant, preset, steps, seed)
    if reuse and (done := reusable(out, variant, fp)) is not None:
        say(f"\n[3–5] {variant.label}: reusing the finished run in {rel(out / 'results' / (variant.name + '.json'))} "
            "(same recipe, budget, seed and stand-ins)")
        return done
    say(f"\n[3] VoRA stage 1 — {variant.label}: frozen LLM + LoRA + patch embedding"
        + ("" if "distill=null" in variant.overrides else ", distilled from the teacher"))
    run_dir = train_stage1(out, variant, preset, steps, seed, clock)
    curve = learning_curve(run_dir, corpus_dir, preset["curve_questions"], clock)
    say(f"  held-out accuracy of the checkpoints ({preset['curve_questions']} questions, colour / shape): "
        # .1f: 79.5 is not 80
        + ", ".join(f"{p['step']}: {100 * p['colour']:.1f}/{100 * p['shape']:.1f}" for p in curve))
    say(f"\n[4] merge (LoRA folded into the LLM; teacher and heads dropped) — {variant.label}")
    merged = merge(out, run_dir, variant, clock)
    acc, rows, answers, cls = evaluate_merged(merged, corpus_dir, clock)
    bars = None if variant.ablation else preset["bars"]
    say(f"\n[5] held-out accuracy — {variant.label} — merged model ({cls.split('.')[-1]} via AutoModelForCausalLM, "
        f"trust_remote_code) answering {len(rows)} questions about {len({r['image'] for r in rows})} unseen images "
        "with generate()")
    print_accuracy(acc, rows, bars)
    s80 = steps_to(curve)
    reached = s80 if s80 is not None else f"not within {steps}"
    say(f"  colour and shape both ≥ {100 * CURVE_TARGET:.0f} % at step: {reached}")
    if samples:
        say("\n  sample answers:")
        print_samples(rows, answers)
    png = run_dir / "loss_curve.png"
    say(f"\n  loss curve: {rel(png) if png.exists() else '(not written)'}")
    result = {
        "variant": variant.name, "label": variant.label, "overrides": variant.overrides, "steps": steps, "seed": seed,
        "heldout_questions": len(rows),
        "fingerprint": fp, "accuracy": acc, "learning_curve": curve, "steps_to_80": s80,
        "final_losses": final_losses(run_dir),
        "train_seconds": clock.parts.get(f"stage 1 ({variant.name})", 0.0), "merged": str(merged),
        "loss_curve": str(png), "bars": bars, "failed_bars": check_bars(acc, bars) if bars else [],
        "samples": [{"image": r["image"], "question": r["question"], "answer": a,
                     "truth": r["answer"]} for r, a in list(zip(rows, answers))[:20]],
    }
    (out / "results").mkdir(parents=True, exist_ok=True)
    with open(out / "results" / f"{variant.name}.json", "w") as f:
        json.dump(result, f, indent=1)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vora-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "demo_out"),
                   help="working directory (default: demo_out/ in the repository)")
    p.add_argument("--fast", action="store_true",
                   help="small budget (~2–2.5 min): smaller corpus, fewer steps; bar colour ≥ 60 %%")
    p.add_argument("--no-distill", action="store_true", help="ablation: no teacher (LM loss only)")
    p.add_argument("--attention", choices=["bidirectional", "causal"], default="bidirectional",
                   help="attention inside image tokens")
    p.add_argument("--lora-layers", type=int, default=None, metavar="K",
                   help="ablation: LoRA on the first K blocks only")
    p.add_argument("--compare", action="store_true",
                   help="run the default, --no-distill and --attention causal; print one table")
    p.add_argument("--compare-lora-layers", type=int, default=None, metavar="K",
                   help="with --compare: also a row with LoRA on the first K blocks only")
    p.add_argument("--steps", type=int, default=None,
                   help=f"stage-1 steps (default: {PRESETS['full']['stage1_steps']}, "
                        f"--fast: {PRESETS['fast']['stage1_steps']})")
    p.add_argument("--seed", type=int, nargs="+", default=[0], metavar="S",
                   help="seed of corpus, stand-ins and training (default 0); several run one after another, each in "
                        "OUT/seed-S/, and the spread across them is printed")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for every stage (default: torch's, one per core); sets OMP_NUM_THREADS=N")
    args = p.parse_args(argv)
    if args.compare and (args.no_distill or args.lora_layers is not None or args.attention != "bidirectional"):
        p.error("--compare runs the ablations itself; "
                "do not combine it with --no-distill / --attention / --lora-layers")
    if len(set(args.seed)) != len(args.seed):
        p.error(f"--seed: each seed once, got {' '.join(map(str, args.seed))}")
    for flag, value in (("--threads", args.threads), ("--steps", args.steps), ("--lora-layers", args.lora_layers),
                        ("--compare-lora-layers", args.compare_lora_layers)):
        if value is not None and value < 1:  # --steps 0 used to mean "the preset's steps"
            p.error(f"{flag}: expected a positive number, got {value}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out}: exists and is not a directory; give a directory (it is created when missing)")
    return args


def quiet_console(log_path: Path) -> None:
    """Send library warnings (transformers' logger, DeepSpeed's logger, Python warnings) to ``log_path`` instead of
    the console: the console is for the demo's own account of what it does."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.add_handler(handler)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(handler)
    logging.getLogger("py.warnings").propagate = False
    # DeepSpeed (imported in this process by transformers' checks) logs through its own stdout handler, made
    # when it is imported, and says at import which accelerator it picked: import it now, writing to the log.
    import contextlib
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        with open(log_path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            from deepspeed.utils import logger as ds_logger
        for h in list(ds_logger.handlers):
            ds_logger.removeHandler(h)
        ds_logger.addHandler(handler)


def run_seed(args, preset: dict, steps: int, seed: int, out: Path) -> tuple[list[dict], Clock]:
    """Corpus, stand-ins and the variant(s) for one seed, in ``out``. Raises :class:`StageError`."""
    clock = Clock()
    out.mkdir(parents=True, exist_ok=True)
    say(f"vora demo ({'fast' if args.fast else 'full'} budget, seed {seed}) in {rel(out)}")
    say("\n[1] synthetic corpus: outlined shapes (4 kinds, 6 colours, 1–3 copies, 2 sizes, varied positions, "
        "backgrounds, image sizes and aspect ratios); LLaVA JSONL with captions, questions, text-only rows")
    say("[2] stand-ins for pretrained checkpoints: a text-only Llama (it knows the words) and a CLIP-style ViT "
        "teacher (supervised on the attributes)")
    prepare(out, preset, seed, clock)
    variants = compare_variants(args.compare_lora_layers) if args.compare else [variant_from_args(args)]
    # --compare reuses variants already finished with the same recipe, budget, seed and stand-ins
    results = [run_variant(out, v, preset, steps, seed, clock, samples=not args.compare or v.name == "vora",
                           reuse=args.compare) for v in variants]
    say(f"\ntime (seed {seed}): " + ", ".join(f"{k} {v:.0f} s" for k, v in clock.parts.items())
        + f"; total {clock.total:.0f} s")
    return results, clock


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.threads is not None:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the training and merge processes
        torch.set_num_threads(args.threads)
    preset = dict(PRESETS["fast" if args.fast else "full"])
    steps = preset["stage1_steps"] if args.steps is None else args.steps
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    quiet_console(out / "logs" / "demo.log")
    t0 = time.time()
    user_cache = os.environ.get("VORA_DATA_CACHE")
    results = []
    try:
        for seed in args.seed:
            seed_out = out / f"seed-{seed}" if len(args.seed) > 1 else out
            os.environ["VORA_DATA_CACHE"] = user_cache or str(seed_out / "cache")
            if len(args.seed) > 1:
                say(f"\n{'=' * 30} seed {seed} {'=' * 30}")
            results += run_seed(args, preset, steps, seed, seed_out)[0]
    except StageError as e:
        say(f"\ndemo: FAILED: {e}")
        say(f"demo: FAIL — a stage failed (library warnings: {rel(out / 'logs' / 'demo.log')})")
        return 1
    if args.compare or len(args.seed) > 1:
        say("\n" + compare_caption(results, args.seed, steps, preset))
        text = print_compare(results)
        (out / "results").mkdir(parents=True, exist_ok=True)
        with open(out / "results" / "compare.txt", "w") as f:
            f.write(text + "\n")
    say(f"\nresults: {rel(out / 'results') if len(args.seed) == 1 else rel(out) + '/seed-*/results'}; "
        f"library warnings: {rel(out / 'logs' / 'demo.log')}; wall time {time.time() - t0:.0f} s")
    default = [r for r in results if r["bars"]]
    if not default:  # an ablation alone has no bar
        say("demo: done — an ablation has no bar")
        return 0
    ok, line = verdict(default, preset["bars"])
    say(line)
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
