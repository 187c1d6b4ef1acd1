"""vora-merge: fold a VoRA training checkpoint's LoRA into its base LLM and write a standalone model.

    vora-merge CHECKPOINT_DIR --output MERGED_DIR [--base LLM_PATH] [--dtype bfloat16]
               [--overwrite] [--max-shard-size 5GB]

For every LoRA-adapted linear layer, W ← W + s·B·A, computed in float32 and stored in the target dtype
(s = lora_alpha / r, or lora_alpha / √r with rsLoRA; per-module rank/alpha patterns honoured).
The base LLM is read shard by shard, one tensor at a time (each through a short-lived `safe_open`), and
output shards are streamed to disk tensor by tensor (the header is written first, from shapes known in
advance), so the peak memory is about the largest tensor (plus its float32 copy when LoRA-adapted),
whatever the model or shard size; the adapter is read per module too.

The output is a `VoRAForCausalLM` checkpoint: the LLM's tensors under `language_model.` (names and shapes
of the base architecture, no LoRA, no extra biases), the patch embedding `vision_embed.*`; no teacher,
no distillation heads. It carries the modeling/processing code (`trust_remote_code=True` loads it
without vora installed), the tokenizer with its chat template, the image-processor and processor
configs and a generation config. The directory appears whole or not at all.

Stage 2: the base may itself be a merged VoRA directory (``model_type: vora``; ``vora_run.json``'s ``base_llm`` of a
stage-2 run). The new LoRA is folded into its ``language_model.*`` tensors; the patch embedding is the checkpoint's
when the run trained it, else the base's. A checkpoint without an adapter (``trainable.llm: frozen``) only replaces
the patch embedding. A full-model checkpoint (``trainable.llm: full``) needs no merge and is refused with that hint.

Every mismatch is refused with a message naming the key, shape or path: adapter keys matching no base
weight, adapter/base shape mismatches, base weights missing or unexpected, a patch embedding that
does not fit the config.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from vora import checkpoint as ckpt
from vora.checkpoint import LLM_ARCH_FIELDS, VORA_GEOMETRY_FIELDS, CheckpointError, check_state_dict
from vora.export import (  # noqa: F401  (complete_full_model, AUTO_MAP: also importable from here, as before)
    AUTO_MAP,
    complete_full_model,
    inference_config,
    save_inference_processor,
    write_code_files,
    write_generation_config,
)
from vora.model import CODE_FILES
from vora.model.configuration_vora import VoRAConfig
from vora.model.image_processing_vora import VoRAImageProcessor
from vora.model.modeling_vora import VoRAPatchEmbed
from vora.model.processing_vora import VoRAProcessor

logger = logging.getLogger("vora.merge")

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
LM_PREFIX = "language_model."

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
TARGET_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MERGEABLE = (torch.float32, torch.float16, torch.bfloat16)
ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class MergeError(ValueError):
    """The checkpoint, the base LLM or the output cannot be merged as asked; the message says why."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """'5GB' → 5·10⁹, '500MiB' → 500·2²⁰, 1234 → 1234 bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise MergeError(f"--max-shard-size: cannot parse {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    number, unit = float(m.group(1)), m.group(2).upper()
    powers = {"": 0, "B": 0, "K": 1, "KB": 1, "KIB": 1, "M": 2, "MB": 2, "MIB": 2, "G": 3, "GB": 3, "GIB": 3,
              "T": 4, "TB": 4, "TIB": 4}
    if unit not in powers:
        raise MergeError(f"--max-shard-size: unknown unit in {text!r}")
    base = 1024 if "I" in unit else 1000
    size = int(number * base ** powers[unit])
    if size < 1:
        raise MergeError(f"--max-shard-size must be positive, got {text!r}")
    return size


def read_header(path: Path) -> dict:
    """A safetensors file's header: {name: {"dtype", "shape", "data_offsets"}} (no tensor data read)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def to_bytes_view(t: torch.Tensor):
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def write_safetensors_streaming(path: Path, entries: list[tuple[str, torch.dtype, tuple]], produce) -> int:
    """Write a safetensors file whose tensors are produced one at a time by ``produce(name)``.

    The header is computed from the (name, dtype, shape) entries and written first; each tensor's bytes
    are written as soon as it is produced and then dropped. Returns the data size in bytes.
    """
    header, offset = {}, 0
    for name, dtype, shape in entries:
        nbytes = numel(shape) * dtype.itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in entries:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise MergeError(f"internal: {name} produced {t.dtype} {list(t.shape)}, planned {dtype} {list(shape)}")
            f.write(to_bytes_view(t))
            del t
    return offset


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def resolve_base(base: str) -> Path:
    """A local directory, or a hub id resolved through the local HF cache (downloaded only when the
    hub is reachable and HF_HUB_OFFLINE is not set)."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MergeError(f"base LLM {base} is a file, not a model directory")
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise MergeError(f"base LLM directory {base} does not exist (pass --base LLM_PATH)")
    try:
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
        return Path(snapshot_download(base, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, no access
        raise MergeError(f"base LLM {base!r} is neither a local directory nor available from the Hugging Face "
                         f"cache/hub ({e}); pass --base LLM_PATH") from e


def base_shards(base: Path) -> tuple[list[Path], dict[str, Path]]:
    """Ordered shard files and name → file, from the index or the single file."""
    index = base / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MergeError(f"{index}: no weight_map")
        files = list(dict.fromkeys(weight_map.values()))
        shards = [base / f for f in files]
        for s in shards:
            if not s.is_file():
                raise MergeError(f"{index} names shard {s.name}, which is missing from {base}")
        return shards, {k: base / v for k, v in weight_map.items()}
    single = base / SAFE_SINGLE
    if single.is_file():
        return [single], {k: single for k in read_header(single)}
    found = sorted(p.name for p in base.glob("*.bin")) + sorted(p.name for p in base.glob("*.pt"))
    hint = f" (found {found[:3]}: convert them to safetensors first)" if found else ""
    raise MergeError(f"base LLM {base}: no {SAFE_SINGLE} or {SAFE_INDEX}{hint}")


def expected_llm_tensors(text_config):
    """(required {name: shape}, optional names) of the LLM architecture, built on the meta device.

    Optional: names that alias another parameter (tied lm_head) — stock checkpoints omit them."""
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text_config)
    state = lm.state_dict()
    unique = {n for n, _ in lm.named_parameters()} | {n for n, _ in lm.named_buffers() if n in state}
    required = {n: tuple(t.shape) for n, t in state.items() if n in unique}
    aliases = {n: tuple(t.shape) for n, t in state.items() if n not in unique}
    ignore = [re.compile(p) for p in (getattr(lm, "_keys_to_ignore_on_load_unexpected", None) or [])]
    return required, aliases, ignore


def lora_scaling(cfg: dict, module: str, rank: int) -> float:
    """peft's scaling for one module: alpha/r (alpha/√r with rsLoRA), rank_pattern/alpha_pattern aware."""

    def pattern(patterns: dict, default):
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    r = pattern(cfg.get("rank_pattern"), cfg["r"])
    alpha = pattern(cfg.get("alpha_pattern"), cfg.get("lora_alpha", 8))
    if r != rank:
        raise MergeError(f"adapter module {module}: lora_A has rank {rank} but adapter_config.json says r={r}")
    return alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r


def read_adapter_config(path: Path) -> dict:
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    refuse = {
        "use_dora": "DoRA adapters",
        "lora_bias": "LoRA biases (lora_bias=True)",
        "modules_to_save": "modules_to_save (fully trained extra modules)",
        "trainable_token_indices": "trainable token indices",
        "target_parameters": "LoRA on nn.Parameter targets",
        "layer_replication": "layer replication",
        "use_bdlora": "block-diagonal LoRA",
        "use_qalora": "QA-LoRA",
        "alora_invocation_tokens": "activated LoRA",
    }
    for key, what in refuse.items():
        if cfg.get(key):
            raise MergeError(f"{path}: {key}={cfg[key]!r}: {what} cannot be folded into a stock architecture")
    if cfg.get("bias", "none") != "none":
        raise MergeError(f"{path}: bias={cfg['bias']!r} trains base biases, which the adapter file does not fold; "
                         "only bias='none' is supported")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise MergeError(f"{path}: r={cfg.get('r')!r} is not a positive int")
    return cfg


def plan_adapter(adapter_file: Path, cfg: dict, base_meta: dict[str, dict]) -> dict[str, dict]:
    """{base weight name: {"A": key, "B": key, "scale": s, "transpose": bool}}, every key and shape checked."""
    header = read_header(adapter_file)
    modules: dict[str, dict] = {}
    for key, meta in header.items():
        m = ADAPTER_KEY.match(key)
        if not m:
            raise MergeError(
                f"{adapter_file}: unexpected adapter key {key!r} (only '<module>.lora_A.weight' / '.lora_B.weight' "
                "of linear layers under 'base_model.model.' can be merged)"
            )
        if ST_NAMES.get(meta["dtype"]) not in MERGEABLE:
            raise MergeError(f"{adapter_file}: {key} has dtype {meta['dtype']}, expected a float type")
        modules.setdefault(m["module"], {})[m["ab"]] = (key, tuple(meta["shape"]))
    plan = {}
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    for module, parts in sorted(modules.items()):
        if set(parts) != {"A", "B"}:
            lacking = "lora_B" if "A" in parts else "lora_A"
            raise MergeError(f"{adapter_file}: module {module} has no {lacking}.weight")
        target = module + ".weight"
        if target not in base_meta:
            raise MergeError(f"{adapter_file}: adapter keys for {module!r} match no base weight "
                             f"(no {target!r} in the base LLM)")
        (a_key, a_shape), (b_key, b_shape) = parts["A"], parts["B"]
        w_shape = tuple(base_meta[target]["shape"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise MergeError(f"{adapter_file}: {module}: lora_A {list(a_shape)} and lora_B {list(b_shape)} "
                             "are not a rank-r pair")
        delta_shape = (b_shape[0], a_shape[1])
        if fan_in_fan_out:
            delta_shape = delta_shape[::-1]
        if delta_shape != w_shape:
            raise MergeError(
                f"shape mismatch for {target}: base weight is {list(w_shape)} but the adapter's B·A is "
                f"{list(delta_shape)} (lora_A {list(a_shape)}, lora_B {list(b_shape)}): was the checkpoint trained on "
                "another base LLM?"
            )
        if ST_NAMES.get(base_meta[target]["dtype"]) not in MERGEABLE:
            raise MergeError(f"base weight {target} has dtype {base_meta[target]['dtype']}; LoRA can only be merged "
                             "into float16/bfloat16/float32 weights")
        plan[target] = {"A": a_key, "B": b_key, "scale": lora_scaling(cfg, module, a_shape[0]),
                        "transpose": fan_in_fan_out}
    if not plan:
        raise MergeError(f"{adapter_file}: no LoRA weights in the adapter")
    return plan


# --------------------------------------------------------------------------------------------
# the merge
# --------------------------------------------------------------------------------------------
def merge(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    base: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    log=None,
    force_base: bool = False,
) -> dict:
    """Merge ``checkpoint`` into a standalone model at ``output``. Returns a summary dict.

    The base is a text LLM (stage 1) or a merged VoRA directory (stage 2: its ``language_model.*`` tensors take
    the LoRA, its ``vision_embed.*`` is kept unless the run trained the patch embedding). A checkpoint without an
    adapter (``trainable.llm: frozen``) only replaces the patch embedding; a full-model checkpoint
    (``trainable.llm: full``) is refused: it needs no merge.

    The output may neither be, contain nor lie inside the checkpoint or the base (real paths compared); an existing
    output is only replaced with ``overwrite`` and only when it is a previous merge output. A base whose fingerprint
    differs from the one recorded at training time is refused unless ``force_base``.
    """
    log = log or logger.info
    t0 = time.time()
    checkpoint = Path(checkpoint).absolute()
    output = Path(output).absolute()
    try:
        run = ckpt.run_info(checkpoint)
        kind = ckpt.checkpoint_kind(checkpoint, run)
        model_type = ckpt.read_json(checkpoint / "config.json").get("model_type") if kind == "full" else "vora"
    except (ckpt.CheckpointError, OSError, json.JSONDecodeError) as e:
        raise MergeError(str(e)) from e
    if kind == "full":
        if model_type != "vora":
            raise MergeError(
                f"{checkpoint} is not a VoRA training checkpoint: it is a plain {model_type or 'unknown'} model "
                f"(config.json model_type {model_type!r}, no {ckpt.ADAPTER_WEIGHTS}). Pass a vora-train checkpoint "
                "(OUTPUT_DIR/checkpoint-N or OUTPUT_DIR/final) as CHECKPOINT; the text LLM is the --base "
                f"(default: base_llm in the checkpoint's {ckpt.RUN_FILE})"
            )
        raise MergeError(
            f"{checkpoint} is a full model (a run that fine-tuned the whole LLM, trainable.llm: full, or a merged "
            "model): it has no LoRA and needs no merge. Load it directly: "
            "AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)"
        )
    check_output_location(output, checkpoint, "checkpoint")
    shard_limit = parse_size(max_shard_size)

    config = VoRAConfig.from_pretrained(str(checkpoint))
    if config.text_config is None:
        raise MergeError(f"{checkpoint / 'config.json'}: no text_config")
    base_ref = base or run.get("base_llm")
    if not base_ref:
        raise MergeError(f"{checkpoint / ckpt.RUN_FILE} does not name the base LLM: pass --base LLM_PATH")
    base_dir = resolve_base(str(base_ref)).absolute()
    check_output_location(output, base_dir, "base LLM")
    check_existing_output(output, overwrite)
    vora_base = check_base_config(base_dir, config)
    try:
        ckpt.check_base_stage(run, vora_base, base_dir)
    except ckpt.CheckpointError as e:
        raise MergeError(str(e)) from e
    fingerprint = check_base_identity(base_dir, run, checkpoint, force_base, log, explicit=base is not None)
    prefix = LM_PREFIX if vora_base else ""  # where the LLM's tensors live in the base's files

    # --- what the base holds, what the architecture needs --------------------------------------
    shards, where = base_shards(base_dir)
    file_meta: dict[str, dict] = {}
    for shard in shards:
        for name, meta in read_header(shard).items():
            if where.get(name) == shard:
                file_meta[name] = meta
    listed_missing = sorted(set(where) - set(file_meta))
    if listed_missing:
        raise MergeError(f"{base_dir / SAFE_INDEX} lists tensors absent from their shard: {listed_missing[:5]}")
    base_vision_meta: dict[str, dict] = {}
    if vora_base:
        other = sorted(n for n in file_meta if not n.startswith((LM_PREFIX, ckpt.VISION_PREFIX)))
        if other:
            raise MergeError(f"VoRA base {base_dir}: unexpected tensors {other[:5]} "
                             f"(expected only {LM_PREFIX}* and {ckpt.VISION_PREFIX}*)")
        base_vision_meta = {n[len(ckpt.VISION_PREFIX):]: m for n, m in file_meta.items()
                            if n.startswith(ckpt.VISION_PREFIX)}
    base_meta = {n[len(prefix):]: m for n, m in file_meta.items() if n.startswith(prefix)}
    required, aliases, ignore = expected_llm_tensors(config.text_config)
    dropped = [n for n in base_meta if n not in required and n not in aliases and any(p.search(n) for p in ignore)]
    for n in dropped:
        del base_meta[n]
    ckpt_check(
        {**required, **aliases},
        {n: tuple(m["shape"]) for n, m in base_meta.items()},
        f"{'VoRA base' if vora_base else 'base LLM'} {base_dir} vs the checkpoint's text_config "
        f"({config.text_config.model_type})"
        + (f" (tensors under {LM_PREFIX})" if vora_base else ""),
        optional=set(aliases),
    )
    quantized = sorted({m["dtype"] for m in base_meta.values() if m["dtype"].startswith("F8")})
    if quantized:
        raise MergeError(f"base LLM {base_dir} stores {quantized} tensors: merge into the unquantized base")

    # --- target dtype -------------------------------------------------------------------------
    if dtype == "auto":
        cfg_dtype = getattr(config.text_config, "dtype", None) or getattr(config.text_config, "torch_dtype", None)
        if isinstance(cfg_dtype, torch.dtype):
            cfg_dtype = str(cfg_dtype).removeprefix("torch.")
        if cfg_dtype not in TARGET_DTYPES:
            counts = Counter(m["dtype"] for m in base_meta.values() if ST_NAMES.get(m["dtype"]) in MERGEABLE)
            by_name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
            cfg_dtype = by_name[counts.most_common(1)[0][0]] if counts else "bfloat16"
        dtype = cfg_dtype
    if dtype not in TARGET_DTYPES:
        raise MergeError(f"--dtype {dtype!r}: use one of auto, {', '.join(TARGET_DTYPES)}")
    target = TARGET_DTYPES[dtype]

    # --- adapter and patch embedding ----------------------------------------------------------
    adapter_file = checkpoint / ckpt.ADAPTER_WEIGHTS
    if kind == "lora":
        adapter_cfg = read_adapter_config(checkpoint / ckpt.ADAPTER_CONFIG)
        recorded = recorded_lora(run, config, checkpoint)
        check_adapter_config(checkpoint / ckpt.ADAPTER_CONFIG, adapter_cfg, recorded)
        lora_plan = plan_adapter(adapter_file, adapter_cfg, base_meta)
        check_adapted_modules(adapter_file, lora_plan, recorded)
    else:
        lora_plan = {}
        log(f"{checkpoint} has no LoRA adapter (the LLM was frozen, trainable.llm: frozen): the LLM weights are "
            f"copied from {base_dir} unchanged; only the patch embedding is replaced")
    vision = load_patch_embedding(checkpoint, config, required=not vora_base)
    if vora_base and (vision is None or not ckpt.patch_embed_trained(run)):
        vision = None  # keep the base's patch embedding (read from its shard when written)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in VoRAPatchEmbed(config).state_dict().items()}
        ckpt_check(expected, {k: tuple(m["shape"]) for k, m in base_vision_meta.items()},
                   f"VoRA base {base_dir} (patch embedding vs the checkpoint's config.json)")
        vision_shapes = {k: tuple(m["shape"]) for k, m in base_vision_meta.items()}
        vision_source = "base"
    else:
        vision_shapes = {k: tuple(t.shape) for k, t in vision.items()}
        vision_source = "checkpoint"

    # --- output plan: base tensors in file order, then the patch embedding ---------------------
    order: list[tuple[str, Path]] = []
    for shard in shards:
        header = read_header(shard)
        names = [n[len(prefix):] for n in header
                 if n.startswith(prefix) and n[len(prefix):] in base_meta and where[n] == shard]
        names.sort(key=lambda n: header[prefix + n]["data_offsets"][0])
        order += [(n, shard) for n in names]

    def out_dtype(src: str) -> torch.dtype:
        d = ST_NAMES[src]
        return target if d.is_floating_point else d

    entries = [(LM_PREFIX + n, out_dtype(base_meta[n]["dtype"]), tuple(base_meta[n]["shape"])) for n, _ in order]
    entries += [(ckpt.VISION_PREFIX + n, target, shape) for n, shape in vision_shapes.items()]
    groups, current, size = [], [], 0
    for e in entries:
        nbytes = numel(e[2]) * e[1].itemsize
        if current and size + nbytes > shard_limit:
            groups.append(current)
            current, size = [], 0
        current.append(e)
        size += nbytes
    groups.append(current)
    n_shards = len(groups)
    source = {LM_PREFIX + n: s for n, s in order}
    log(
        f"merging {checkpoint} into {'the VoRA model' if vora_base else ''} {base_dir} → {output}: "
        f"{len(lora_plan)} LoRA-adapted weights, patch embedding from the {vision_source}, "
        f"{len(entries)} tensors, {n_shards} output shard(s), dtype {dtype}"
    )

    # --- stream -------------------------------------------------------------------------------
    # Each tensor is read through its own short-lived safe_open: the file mapping (and the page-cache
    # pages it made resident) is dropped right after the copy, so RSS stays at about one tensor, not a
    # whole shard, whatever the shard size.
    def read(path: Path, key: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)

    for stale in ckpt.stale_temp_dirs(output):
        log(f"removing {stale}: the temporary directory of a merge that did not finish (its process is gone)")
        shutil.rmtree(stale, ignore_errors=True)
    provenance = {"checkpoint": str(checkpoint), "base": str(base_dir), "base_fingerprint": fingerprint, "dtype": dtype}
    with ckpt.atomic_directory(output, overwrite=overwrite) as tmp:

        def produce(name: str) -> torch.Tensor:
            if name.startswith(ckpt.VISION_PREFIX):
                key = name[len(ckpt.VISION_PREFIX):]
                t = vision[key] if vision is not None else read(where[name], name)
                return t.to(target)
            llm_name = name[len(LM_PREFIX):]
            w = read(source[name], prefix + llm_name)
            lora = lora_plan.get(llm_name)
            if lora is None:
                return w.to(target) if w.is_floating_point() else w
            a = read(adapter_file, lora["A"]).float()
            b = read(adapter_file, lora["B"]).float()
            w32 = w.float() if w.dtype != torch.float32 else w.clone()
            del w
            if lora["transpose"]:
                w32.addmm_(a.t(), b.t(), alpha=lora["scale"])
            else:
                w32.addmm_(b, a, alpha=lora["scale"])
            return w32.to(target)

        weight_map, total = {}, 0
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            total += write_safetensors_streaming(tmp / fname, group, produce)
            weight_map.update({name: fname for name, _, _ in group})
            log(f"  wrote {fname} ({len(group)} tensors)")
        n_params = sum(numel(s) for _, _, s in entries)
        index = {"metadata": {"total_size": total, "total_parameters": n_params}, "weight_map": weight_map}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        write_support_files(tmp, checkpoint, base_dir, config, target, {**run, MERGE_KEY: provenance})
    summary = {
        "output": str(output), "base": str(base_dir), "base_kind": "vora" if vora_base else "llm", "dtype": dtype,
        "shards": n_shards, "tensors": len(entries), "lora_weights": len(lora_plan), "patch_embedding": vision_source,
        "parameters": n_params, "bytes": total, "seconds": round(time.time() - t0, 2),
    }
    log(f"done in {summary['seconds']} s: {n_params:,} parameters, {total / 1e9:.2f} GB")
    return summary


MERGE_KEY = "merged"  # vora_run.json of a merged model: how it was made; also marks it as replaceable by --overwrite


def _is_within(inner: Path, outer: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies under it on the real file system: symlinks and '..' resolved, and
    existing directories compared by device and inode too (bind mounts, other aliases)."""
    inner_r, outer_r = inner.resolve(), outer.resolve()
    if inner_r == outer_r or inner_r.is_relative_to(outer_r):
        return True
    try:
        target = os.stat(outer_r)
    except OSError:
        return False
    for p in (inner_r, *inner_r.parents):
        try:
            if os.path.samestat(os.stat(p), target):
                return True
        except OSError:
            continue
    return False


def check_output_location(output: Path, source: Path, what: str) -> None:
    """The output may not be the ``source`` (checkpoint or base), lie inside it, or contain it: writing there would
    change the input, and --overwrite would delete it. Refused whatever the spelling (symlinks, '..', aliases)."""
    real = f" (really {output.resolve()})" if output.resolve() != output else ""
    if _is_within(output, source):
        where = "is" if output.resolve() == source.resolve() else "is inside"
        raise MergeError(f"output {output}{real} {where} the {what} {source}: choose an --output outside it")
    if _is_within(source, output):
        raise MergeError(f"output {output}{real} contains the {what} {source}: choose an --output outside it")


def is_merge_output(directory: Path) -> bool:
    """Whether ``directory`` is what vora-merge writes: its vora_run.json says so, or (older merges) a VoRA model with
    the code files and no training state (no adapter, no trainer state, not a full fine-tuning run)."""
    try:
        run = ckpt.run_info(directory)
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if isinstance(run.get(MERGE_KEY), dict):
        return True
    return (
        config.get("model_type") == "vora" and bool(config.get("auto_map")) and ckpt.is_full_model(directory)
        and all((directory / f).is_file() for f in CODE_FILES)
        and not (directory / ckpt.ADAPTER_WEIGHTS).exists() and not (directory / "trainer_state.json").exists()
        and (run.get("trainable") or {}).get("llm") != "full"
    )


def check_existing_output(output: Path, overwrite: bool) -> None:
    """An existing output is replaced only with ``overwrite``, and only when it is empty or a previous merge output:
    --overwrite never deletes anything else (a run directory, a model, a file)."""
    if not output.exists() and not output.is_symlink():
        return
    if not overwrite:
        raise MergeError(f"output {output} already exists (pass --overwrite to replace a previous merge output)")
    if output.is_symlink():
        raise MergeError(f"output {output} is a symbolic link (to {output.resolve()}): --overwrite does not replace "
                         "links; pass the real directory or another --output")
    if not output.is_dir():
        raise MergeError(f"output {output} is a file, not a previous merge output: not replacing it")
    if any(output.iterdir()) and not is_merge_output(output):
        raise MergeError(f"output {output} exists and is not a previous vora-merge output (no '{MERGE_KEY}' entry in "
                         "its vora_run.json): --overwrite only replaces merge outputs; choose another --output")


def short(fingerprint: dict | None) -> str:
    return fingerprint["sha256"][:12] if isinstance(fingerprint, dict) and fingerprint.get("sha256") else "none"


def check_base_identity(base_dir: Path, run: dict, checkpoint: Path, force_base: bool, log,
                        explicit: bool = True) -> dict | None:
    """Print the base used next to the one recorded at training time; refuse a base whose fingerprint differs from
    the recorded one unless ``force_base``. Returns the base's fingerprint (for the output's provenance)."""
    given = ckpt.base_fingerprint(base_dir)
    recorded, recorded_base = run.get("base_fingerprint"), run.get("base_llm")
    log(f"base: {base_dir} (fingerprint {short(given)}); recorded at training time: {recorded_base} "
        f"(fingerprint {short(recorded) if recorded else 'not recorded'})")
    if isinstance(recorded, dict) and recorded.get("sha256"):
        if given is not None and given["sha256"] == recorded["sha256"]:
            return given
        sizes = "" if given is None or given["files"] != recorded.get("files") else " (same file sizes, other contents)"
        problem = (f"the base {base_dir} (fingerprint {short(given)}) is not the base the checkpoint was trained on: "
                   f"{recorded_base} (fingerprint {short(recorded)}, in {checkpoint / ckpt.RUN_FILE}){sizes}")
        if not force_base:
            raise MergeError(f"{problem}; pass the right --base, or --force-base to merge into this one anyway")
        log(f"warning: {problem}; merging anyway (--force-base)")
    elif explicit and recorded_base and Path(str(recorded_base)).expanduser().resolve() != base_dir.resolve():
        log(f"notice: {checkpoint / ckpt.RUN_FILE} records no base fingerprint (older checkpoint): only the base's "
            f"config.json was checked; the checkpoint was trained on {recorded_base}, merging into {base_dir}")
    return given


def recorded_lora(run: dict, config, checkpoint: Path) -> list[tuple[str, dict]]:
    """The LoRA the run trained, as recorded: (where, {"rank", "layers", "targets"}) from vora_run.json's recipe and
    from config.json's lora_* fields (either may be absent in older or hand-made checkpoints)."""
    found = []
    lora = (run.get("recipe") or {}).get("lora")
    if isinstance(lora, dict):
        found.append((f"{checkpoint / ckpt.RUN_FILE} recipe lora", lora))
    if getattr(config, "lora_rank", None) is not None:
        found.append((f"{checkpoint / 'config.json'} lora_*",
                      {"rank": config.lora_rank, "layers": config.lora_layers, "targets": config.lora_targets}))
    return found


def check_adapter_config(path: Path, cfg: dict, recorded: list[tuple[str, dict]]) -> None:
    """adapter_config.json must describe the LoRA the run recorded (VoRA trains with lora_alpha = r on the first
    ``layers`` blocks): an adapter from another run is refused, naming the field and both values."""
    for where, lora in recorded:
        rank, layers, targets = lora.get("rank"), lora.get("layers"), lora.get("targets")
        checks = []
        if rank is not None:
            checks += [("r", cfg.get("r"), rank, "rank"),
                       ("lora_alpha", cfg.get("lora_alpha"), rank, "rank (alpha = r)")]
        if targets and isinstance(cfg.get("target_modules"), list):
            checks.append(("target_modules", sorted(cfg["target_modules"]), sorted(targets), "targets"))
        ltt = cfg.get("layers_to_transform")
        if layers is not None and ltt is not None:
            checks.append(("layers_to_transform", sorted([ltt] if isinstance(ltt, int) else ltt),
                           list(range(layers)), "layers"))
        for field, got, want, name in checks:
            if got != want:
                raise MergeError(f"{path}: {field}={got!r} but the run recorded {name} {want!r} ({where}): the adapter "
                                 "is not this run's; merge the checkpoint directory it was saved in")


def check_adapted_modules(path: Path, plan: dict, recorded: list[tuple[str, dict]]) -> None:
    """The adapter's weights must cover exactly the recorded layers and targets."""
    got_layers = sorted({int(m.group(1)) for k in plan if (m := re.search(r"\.layers\.(\d+)\.", k))})
    got_targets = sorted({k.removesuffix(".weight").rsplit(".", 1)[-1] for k in plan})
    for where, lora in recorded:
        if lora.get("layers") is not None and got_layers != list(range(lora["layers"])):
            raise MergeError(f"{path}: adapts blocks {got_layers} but the run recorded layers {lora['layers']} "
                             f"({where}): the adapter is not this run's")
        if lora.get("targets") and got_targets != sorted(lora["targets"]):
            raise MergeError(f"{path}: adapts {got_targets} but the run recorded targets {sorted(lora['targets'])} "
                             f"({where}): the adapter is not this run's")


def ckpt_check(expected, got, what, optional=frozenset()):
    try:
        check_state_dict(expected, got, what, optional=optional)
    except CheckpointError as e:
        raise MergeError(str(e)) from e


def check_base_config(base_dir: Path, config) -> bool:
    """The base's config.json must describe the architecture the checkpoint was trained on. Returns whether the
    base is a merged VoRA model (stage 2) rather than a text LLM."""
    path = base_dir / "config.json"
    if not path.is_file():
        raise MergeError(f"base LLM {base_dir} has no config.json")
    base_cfg = json.loads(path.read_text())
    text_config = getattr(config, "text_config", None) or config
    vora_base = base_cfg.get("model_type") == "vora"
    if vora_base:
        for f in VORA_GEOMETRY_FIELDS:
            a, b = base_cfg.get(f), getattr(config, f, None)
            if a is not None and b is not None and a != b:
                raise MergeError(f"VoRA base {path}: {f}={a!r} but the checkpoint's config.json has {f}={b!r}: "
                                 "wrong base?")
        base_cfg = base_cfg.get("text_config") or {}
        where = f"VoRA base {path}: text_config."
    else:
        where = f"base LLM {path}: "
    for f in LLM_ARCH_FIELDS:
        a, b = base_cfg.get(f), getattr(text_config, f, None)
        if a is not None and b is not None and a != b:
            raise MergeError(f"{where}{f}={a!r} but the checkpoint's text_config has {f}={b!r}: wrong base LLM?")
    return vora_base


def load_patch_embedding(checkpoint: Path, config, required: bool = True) -> dict[str, torch.Tensor] | None:
    """``vision_embed.*`` from vora_trainable.safetensors (prefix stripped), checked against the config;
    ``distill_heads.*`` dropped. None when the file holds no patch embedding and ``required`` is false."""
    path = checkpoint / ckpt.TRAINABLE_WEIGHTS
    try:
        vision, _heads = ckpt.split_trainable(load_file(str(path)), str(path))
    except ckpt.CheckpointError as e:
        raise MergeError(str(e)) from e
    if not vision and not required:
        return None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VoRAPatchEmbed(config).state_dict().items()}
    ckpt_check(expected, {k: tuple(v.shape) for k, v in vision.items()}, f"{path} (patch embedding vs config.json)")
    return vision


def write_support_files(tmp: Path, checkpoint: Path, base_dir: Path, config, target: torch.dtype, run: dict) -> None:
    """config.json (auto_map), the vora code files, processor/tokenizer/image-processor files, generation config."""
    config = inference_config(config, str(target).removeprefix("torch."))
    config.save_pretrained(str(tmp))
    processor = build_processor(checkpoint, base_dir, config)
    save_inference_processor(tmp, processor)
    try:
        write_code_files(tmp)
    except CheckpointError as e:
        raise MergeError(str(e)) from e
    write_generation_config(tmp, config, processor.tokenizer, (checkpoint, base_dir))
    base_run = ckpt.run_info(base_dir)
    if run and base_run and ckpt.base_is_vora(base_dir):
        run = {**run, "base_run": base_run}  # stage 2: keep how the base was made
    ckpt.write_run(tmp, run)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


def build_processor(checkpoint: Path, base_dir: Path, config):
    """The checkpoint's processor if it saved one, else the base tokenizer + an image processor from the
    config. Its '<image>' id and patch size must agree with the config."""
    if has_tokenizer(checkpoint):
        processor = VoRAProcessor.from_pretrained(str(checkpoint))
        source = checkpoint
    elif (base_dir / "processor_config.json").is_file() and has_tokenizer(base_dir):  # a VoRA base (stage 2)
        processor = VoRAProcessor.from_pretrained(str(base_dir))
        source = base_dir
    else:
        if not has_tokenizer(base_dir):
            raise MergeError(
                f"no tokenizer in the checkpoint {checkpoint} nor in the base LLM {base_dir} "
                f"(expected one of {', '.join(TOKENIZER_FILES)}): save the processor with the checkpoint"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        ip = VoRAImageProcessor(patch_size=config.patch_size, min_pixels=config.min_pixels,
                                max_pixels=config.max_pixels)
        processor = VoRAProcessor(image_processor=ip, tokenizer=tokenizer)
        source = base_dir
    if processor.image_token_id != config.image_token_id:
        raise MergeError(
            f"the tokenizer from {source} maps {processor.image_token!r} to id {processor.image_token_id} but "
            f"config.json has image_token_id={config.image_token_id}"
        )
    if processor.image_processor.patch_size != config.patch_size:
        raise MergeError(
            f"the image processor from {source} has patch_size={processor.image_processor.patch_size} but "
            f"config.json has patch_size={config.patch_size}"
        )
    # A merged model is for generation: save_inference_processor pads batches on the left.
    return processor


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vora-merge",
        description="Fold a VoRA training checkpoint's LoRA into its base LLM and write a standalone model "
        "(loadable with AutoModelForCausalLM/AutoProcessor, trust_remote_code=True).",
    )
    p.add_argument("checkpoint", help="training checkpoint directory (adapter_model.safetensors, "
                   "vora_trainable.safetensors, config.json, vora_run.json)")
    p.add_argument("--output", "-o", required=True, help="directory to create for the merged model")
    p.add_argument("--base",
                   help="base LLM directory or hub id (default: base_llm from the checkpoint's vora_run.json)")
    p.add_argument("--dtype", default="auto", choices=["auto", *TARGET_DTYPES],
                   help="stored dtype (default: the base's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory (only a previous merge output)")
    p.add_argument("--force-base", action="store_true",
                   help="merge into --base even if its fingerprint differs from the base recorded at training time")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = merge(args.checkpoint, args.output, base=args.base, dtype=args.dtype, overwrite=args.overwrite,
                        max_shard_size=args.max_shard_size, log=lambda m: print(m, flush=True),
                        force_base=args.force_base)
    except (MergeError, FileExistsError) as e:
        raise SystemExit(f"vora-merge: error: {e}") from None
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
