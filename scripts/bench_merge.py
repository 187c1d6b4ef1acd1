"""Peak memory (RSS) and time of vora-merge on a ~1 B-parameter synthetic model.

    python scripts/bench_merge.py [--workdir /tmp/vora_bench_merge] [--layers 18] [--hidden 2048]
                                  [--shard-size 500MB] [--rank 64] [--lora-layers 8] [--keep]

Builds (without ever holding the model in memory) a Qwen2-architecture base LLM of random bf16 tensors
written straight to several safetensors shards, a tokenizer, and a VoRA training checkpoint with a random
rank-64 LoRA on the first 8 blocks (all 7 projections) and a patch embedding. Then runs the merge in a
fresh subprocess and reports its peak RSS (VmHWM from /proc/self/status), the RSS of the same
interpreter after imports only, and the wall time. Everything is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Peak RSS = VmHWM of /proc/self/status (the high-water mark of this address space). Not ru_maxrss:
# Linux carries the parent's RSS into a child's ru_maxrss across fork/vfork + exec.
MEASURE = r"""
import json, sys, time

def vm_hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

import torch, transformers, safetensors, vora
from merge_tools.merge import merge
after_import = vm_hwm_kib()
if sys.argv[1] == "merge":
    t1 = time.time()
    merge(sys.argv[2], sys.argv[3], max_shard_size=sys.argv[4], log=lambda m: None)
    seconds = time.time() - t1
else:
    seconds = 0.0
peak = vm_hwm_kib()
print(json.dumps({"import_kib": after_import, "peak_kib": peak, "merge_s": seconds}))
"""


def build(work: Path, layers: int, hidden: int, vocab: int, shard_size: int, rank: int, lora_layers: int) -> dict:
    import torch
    from transformers import Qwen2Config

    from merge_tools.merge import expected_llm_tensors, write_safetensors_streaming
    from tests.helpers_data import build_tokenizer
    from vora import VoRAConfig
    from vora.lora import lora_config
    from vora.model.modeling_vora import VoRAPatchEmbed

    base = work / "base"
    base.mkdir(parents=True)
    tok = build_tokenizer(str(base), "chatml", with_image_token=True)
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 256 * 256,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512), max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="bfloat16",
    )
    cfg.save_pretrained(base)
    required, _, _ = expected_llm_tensors(cfg)
    # write the base straight to shards, one random tensor at a time
    groups, cur, size = [], [], 0
    for name, shape in required.items():
        n = 2
        for s in shape:
            n *= s
        if cur and size + n > shard_size:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, torch.bfloat16, shape))
        size += n
    groups.append(cur)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        total += write_safetensors_streaming(
            base / fname, group,
            lambda name, shapes=dict((n, s) for n, _, s in group): (
                torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
        )
        weight_map.update({n: fname for n, _, _ in group})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))

    # training checkpoint: peft-format adapter, patch embedding, configs
    ckpt = work / "checkpoint"
    ckpt.mkdir()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vcfg = VoRAConfig(text_config=cfg, image_token_id=image_token_id, patch_size=14, vision_embed_dim=1024,
                      position_grid=32)
    vcfg.save_pretrained(ckpt)
    lcfg = lora_config(lora_layers, rank)
    lcfg.save_pretrained(str(ckpt))
    adapter = {}
    for name, shape in required.items():
        parts = name.split(".")
        if (len(parts) > 3 and parts[1] == "layers" and int(parts[2]) < lora_layers
                and parts[-2] in lcfg.target_modules and parts[-1] == "weight"):
            module = name[: -len(".weight")]
            out_f, in_f = shape
            adapter[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.01
            adapter[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
    from safetensors.torch import save_file

    save_file(adapter, str(ckpt / "adapter_model.safetensors"), metadata={"format": "pt"})
    pe = VoRAPatchEmbed(vcfg)
    trainable = {f"vision_embed.{k}": v.contiguous() for k, v in pe.state_dict().items()}
    trainable["distill_heads.0.weight"] = torch.zeros(1024, hidden)
    save_file(trainable, str(ckpt / "vora_trainable.safetensors"), metadata={"format": "pt"})
    (ckpt / "vora_run.json").write_text(json.dumps({"base_llm": str(base), "teacher": None, "recipe": {}}))
    n_params = sum(_numel(s) for s in required.values())
    return {
        "base": base, "ckpt": ckpt, "params": n_params, "base_bytes": total, "shards": len(groups),
        "adapter_params": sum(t.numel() for t in adapter.values()),
        "adapter_bytes": (ckpt / "adapter_model.safetensors").stat().st_size,
    }


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def spot_check(info, merged: Path, rank: int) -> None:
    """One adapted weight of the output equals (W + B·A) in fp32, rounded to bf16 once."""
    import torch
    from safetensors import safe_open

    key = "model.layers.0.mlp.down_proj"
    index = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]
    base_index = json.loads((info["base"] / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(merged / index[f"language_model.{key}.weight"]), "pt") as f:
        got = f.get_tensor(f"language_model.{key}.weight")
    with safe_open(str(info["base"] / base_index[f"{key}.weight"]), "pt") as f:
        w = f.get_tensor(f"{key}.weight").float()
    with safe_open(str(info["ckpt"] / "adapter_model.safetensors"), "pt") as f:
        a = f.get_tensor(f"base_model.model.{key}.lora_A.weight")
        b = f.get_tensor(f"base_model.model.{key}.lora_B.weight")
    want = (w + b @ a).to(torch.bfloat16)  # lora_alpha = r: scale 1
    if not torch.equal(got, want):
        raise SystemExit(f"spot check failed for {key}: max |diff| {(got.float() - want.float()).abs().max()}")


def run_measure(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", MEASURE, *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-size", default="500MB", help="shard size of the synthetic base")
    p.add_argument("--out-shard-size", default="500MB", help="vora-merge --max-shard-size")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--lora-layers", type=int, default=8)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    args.lora_layers = min(args.lora_layers, args.layers)

    from merge_tools.merge import parse_size

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vora_bench_merge_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.time()
        info = build(work, args.layers, args.hidden, args.vocab, parse_size(args.shard_size), args.rank,
                     args.lora_layers)
        build_s = time.time() - t0
        shard_sizes = sorted((f.stat().st_size for f in info["base"].glob("*.safetensors")), reverse=True)
        idle = run_measure("imports")
        res = run_measure("merge", str(info["ckpt"]), str(work / "merged"), args.out_shard_size)
        spot_check(info, work / "merged", args.rank)
        merged_bytes = sum(f.stat().st_size for f in (work / "merged").glob("*.safetensors"))
        mib = 1 / 1024
        print(f"model: Qwen2 {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: "
              f"{info['params'] / 1e9:.3f} B parameters, {info['base_bytes'] / 2**30:.2f} GiB bf16 in {info['shards']} "
              f"shards (largest {shard_sizes[0] / 2**20:.0f} MiB); built in {build_s:.0f} s")
        print(f"adapter: rank {args.rank} on {args.lora_layers} blocks x 7 projections: "
              f"{info['adapter_params'] / 1e6:.1f} M parameters, "
              f"{info['adapter_bytes'] / 2**20:.0f} MiB (fp32)")
        print(f"merged output: {merged_bytes / 2**30:.2f} GiB, --max-shard-size {args.out_shard_size}")
        print(f"peak RSS of the merge process: {res['peak_kib'] * mib:.0f} MiB "
              f"(interpreter after imports: {idle['peak_kib'] * mib:.0f} MiB; "
              f"merge adds {(res['peak_kib'] - idle['peak_kib']) * mib:.0f} MiB)")
        print(f"merge time: {res['merge_s']:.1f} s")
        print(json.dumps({"params": info["params"], "base_bytes": info["base_bytes"],
                          "largest_shard_bytes": shard_sizes[0],
                          "adapter_bytes": info["adapter_bytes"], "peak_rss_mib": round(res["peak_kib"] * mib),
                          "import_rss_mib": round(idle["peak_kib"] * mib), "merge_s": round(res["merge_s"], 1)}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
