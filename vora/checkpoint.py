"""Training checkpoints: what a VoRA run saves, and how to load it back (strictly).

A checkpoint directory (see DEVELOPERS.md) holds

- ``adapter_model.safetensors`` + ``adapter_config.json``: peft's own format for the LoRA of
  ``model.language_model`` (``PeftModel.save_pretrained``);
- ``vora_trainable.safetensors``: the patch embedding ``vision_embed.*`` and the distillation heads
  ``distill_heads.*`` (the merge drops the heads);
- ``config.json``: the :class:`VoRAConfig` (``text_config`` nested);
- ``vora_run.json``: ``{"base_llm": ..., "teacher": ..., "recipe": {...}}``;
- the processor's files (tokenizer, chat template, image-processor config) when a processor is given.

The base LLM's weights are never copied: ``vora_run.json`` says where they are. The base is a text LLM (stage 1)
or a merged VoRA directory (stage 2: keys ``language_model.*`` + ``vision_embed.*``, ``model_type: vora``).

A run whose LLM was frozen saves no adapter (``vora_run.json``: ``trainable.llm: frozen``); a run that trained the
whole LLM saves a full model (``save_pretrained``), which needs no merge. :func:`checkpoint_kind` tells them apart.

:func:`save_trainable` writes a new directory atomically (temp directory next to it, then rename).
:func:`write_trainable` writes the same files into an existing directory (e.g. the ``checkpoint-N``
directory HF Trainer has just created with its optimizer state). :func:`load_trainable` rebuilds the model from a
checkpoint; :func:`read_trainable_weights` / :func:`read_full_weights` read one back, strictly, into a model being
trained (resume, :mod:`vora.resume`); :func:`validate_checkpoint` checks one cheaply before a resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import snapshot_download
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from .model.configuration_vora import VoRAConfig
from .model.modeling_vora import VoRAForCausalLM

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINABLE_WEIGHTS = "vora_trainable.safetensors"
CONFIG = "config.json"
RUN_FILE = "vora_run.json"
VISION_PREFIX = "vision_embed."
HEADS_PREFIX = "distill_heads."


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is (missing file, wrong keys or shapes)."""


# --------------------------------------------------------------------------------------------
# atomic directories
# --------------------------------------------------------------------------------------------
TMP_MARK = ".tmp-"
# A temp directory's name says who owns it: ``.NAME.tmp-PID@HOST-XXXXXXXX`` (XXXXXXXX from mkdtemp), so a later run can
# tell the leftovers of a killed process (dead PID on this host) from a live writer's work in progress.
TMP_OWNER = re.compile(r"\.tmp-(?P<pid>\d+)@(?P<host>.+)-[^-]+$")
STALE_TMP_AGE_S = 24 * 3600  # a temp dir of unknown owner (other host, older naming) untouched this long is stale


def fsync_tree(directory: str | os.PathLike) -> None:
    """``fsync`` every file under ``directory`` and every directory (bottom-up), so that a rename that publishes
    it is never seen before its contents (after a power loss)."""
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _newest_mtime(directory: Path) -> float:
    newest = directory.stat().st_mtime
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def stale_temp_dirs(final: str | os.PathLike, max_age_s: float = STALE_TMP_AGE_S) -> list[Path]:
    """Temp directories of :func:`atomic_directory` for ``final`` left behind by a killed writer: those whose owner
    PID (on this host) is dead, and those of unknown owner not modified for ``max_age_s`` seconds. A live writer's
    temp directory is never listed."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    host, now, stale = _host(), time.time(), []
    for p in final.parent.glob(f".{glob_escape(final.name)}{TMP_MARK}*"):
        if not p.is_dir() or p.is_symlink():
            continue
        m = TMP_OWNER.search(p.name)
        if m and m["host"] == host:
            if int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])):
                stale.append(p)
        elif now - _newest_mtime(p) > max_age_s:
            stale.append(p)
    return sorted(stale)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def swap_into_place(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a complete ``tmp`` directory to ``final`` (an existing ``final`` is moved aside, then deleted).
    ``tmp``'s files and directories are fsynced before the rename and the parent after it: after a crash or a
    power loss ``final`` is the old or the new directory, whole."""
    final = Path(final).absolute()
    fsync_tree(tmp)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / "x")
        os.replace(tmp, final)
        fsync_dir(final.parent)  # the new directory is in place for good before the old one goes
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False):
    """Yield a fresh temporary directory next to ``final``; on success it becomes ``final`` with one
    rename, on any failure (exceptions, Ctrl-C) it is removed. ``final`` is never seen half-written, and
    its files are on disk (``fsync``) before the rename publishes them.

    With ``overwrite`` an existing ``final`` is moved aside, replaced, then deleted; without it an
    existing ``final`` is an error (raised before any work is done). The temporary directory is named
    ``.NAME.tmp-PID@HOST-XXXXXXXX`` (see :func:`stale_temp_dirs`).
    """
    final = Path(final).absolute()
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite=True / --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{os.getpid()}@{_host()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}{owner}", dir=final.parent))
    try:
        yield tmp
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} appeared while writing; not replacing it without overwrite")
        swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# several ranks: saves are collective; ZeRO-3 partitions the parameters a checkpoint is written from / read into
# --------------------------------------------------------------------------------------------
def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def param_shape(p) -> tuple:
    """A parameter's full shape, also when ZeRO-3 holds only this rank's partition of it."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def gathered(params, modifier_rank=None):
    """Context that materialises ZeRO-3 partitioned params (a no-op for ordinary ones)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    # Only ZeRO-3 parameters reach here, so deepspeed is already loaded (importing it is slow and logs).
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------
def trainable_state_dict(model, heads=None) -> dict[str, torch.Tensor]:
    """The non-LoRA trainables: ``vision_embed.*`` and ``distill_heads.*`` (from ``model.distill_heads``
    or the ``heads`` module given), detached, contiguous, on CPU."""
    out = {}
    for name, tensor in model.vision_embed.state_dict().items():
        out[VISION_PREFIX + name] = tensor
    heads = heads if heads is not None else getattr(model, "distill_heads", None)
    if heads is not None:
        for name, tensor in heads.state_dict().items():
            out[HEADS_PREFIX + name] = tensor
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` to one safetensors file (``{"format": "pt"}`` metadata, as transformers and peft write it)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_run(directory: str | os.PathLike, run: dict) -> None:
    """``directory/vora_run.json``: how the weights were made (base LLM, teacher, recipe, ...)."""
    (Path(directory) / RUN_FILE).write_text(json.dumps(run, indent=2, default=str) + "\n")


def write_trainable(
    model,
    directory: str | os.PathLike,
    *,
    base_llm: str,
    teacher=None,
    recipe: dict | None = None,
    processor=None,
    heads=None,
    trainable: dict[str, torch.Tensor] | None = None,
    adapter_state_dict: dict | None = None,
) -> Path:
    """Write the checkpoint files into ``directory`` (created if needed, files replaced).

    ``model``: a :class:`VoRAForCausalLM` whose ``language_model`` is a peft model (``vora.lora.add_lora``).
    ``trainable`` / ``adapter_state_dict``: pass gathered state dicts when parameters are partitioned
    (ZeRO-3); by default they are read from the model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lm = model.language_model
    if not isinstance(lm, PeftModel):
        raise CheckpointError("write_trainable: model.language_model has no LoRA adapter "
                              "(call vora.lora.add_lora first)")
    kwargs = {} if adapter_state_dict is None else {"state_dict": adapter_state_dict}
    lm.save_pretrained(str(directory), safe_serialization=True, **kwargs)
    tensors = trainable if trainable is not None else trainable_state_dict(model, heads)
    bad = [k for k in tensors if not k.startswith((VISION_PREFIX, HEADS_PREFIX))]
    if bad:
        raise CheckpointError(f"write_trainable: unexpected trainable keys {bad[:5]} "
                              f"(only {VISION_PREFIX}* and {HEADS_PREFIX}*)")
    write_safetensors(directory / TRAINABLE_WEIGHTS, tensors)
    model.config.save_pretrained(str(directory))
    write_run(directory, {"base_llm": str(base_llm), "teacher": teacher, "recipe": recipe or {}})
    if processor is not None:
        processor.save_pretrained(str(directory))
    return directory


def save_trainable(model, directory: str | os.PathLike, *, overwrite: bool = False, **kwargs) -> Path:
    """:func:`write_trainable` into a new directory that appears whole or not at all."""
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_trainable(model, tmp, **kwargs)
    return Path(directory)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def run_info(directory: str | os.PathLike) -> dict:
    """The contents of ``directory/vora_run.json``, ``{}`` when there is none."""
    path = Path(directory) / RUN_FILE
    return read_json(path) if path.is_file() else {}


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object file; an empty, truncated or non-object file is a :class:`CheckpointError` naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        raise CheckpointError(f"{path}: not a readable JSON file ({size} bytes: {e}); "
                              "the checkpoint is damaged") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}; the checkpoint is damaged")
    return data


def read_run(directory: str | os.PathLike) -> dict:
    """``vora_run.json``, which must exist and name the base LLM."""
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint does not say which base LLM it was trained on")
    run = run_info(directory)
    if not run.get("base_llm"):
        raise CheckpointError(f"{path}: no 'base_llm' entry")
    return run


def require_files(directory: str | os.PathLike,
                  names=(ADAPTER_WEIGHTS, ADAPTER_CONFIG, TRAINABLE_WEIGHTS, CONFIG)) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} lacks {', '.join(missing)} (is it a vora training checkpoint?)")
    return directory


def is_full_model(directory: str | os.PathLike) -> bool:
    """A ``save_pretrained`` directory (``model.safetensors`` or its sharded index)."""
    directory = Path(directory)
    return (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()


def checkpoint_kind(directory: str | os.PathLike, run: dict | None = None) -> str:
    """What a checkpoint directory holds, its files checked:

    - ``"lora"``: peft adapter + ``vora_trainable.safetensors`` + ``config.json`` (LoRA on the LLM);
    - ``"frozen"``: no adapter, the LLM was frozen (``vora_run.json``: ``trainable.llm: frozen``): only the patch
      embedding (and distillation heads) trained;
    - ``"full"``: a full model (``trainable.llm: full``, ``save_pretrained``): nothing to merge.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not (directory / ADAPTER_WEIGHTS).is_file() and not (directory / ADAPTER_CONFIG).is_file():
        if run is None:
            run = run_info(directory)
        llm = (run.get("trainable") or {}).get("llm")
        if is_full_model(directory) and (directory / CONFIG).is_file():
            return "full"
        if llm == "frozen":
            require_files(directory, (TRAINABLE_WEIGHTS, CONFIG))
            return "frozen"
    require_files(directory)
    return "lora"


def base_is_vora(base: str | os.PathLike) -> bool:
    """Whether ``base`` (a local directory) is a merged VoRA model (stage 2) rather than a text LLM."""
    path = Path(base) / CONFIG
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == "vora"
    except (OSError, json.JSONDecodeError):
        return False


FINGERPRINT_SAMPLES = 16  # evenly spaced 64 KiB reads per weights file
FINGERPRINT_CHUNK = 1 << 16


def base_fingerprint(base: str | os.PathLike) -> dict | None:
    """A cheap identity of a model directory's weights, recorded in ``vora_run.json`` at training time and checked by
    vora-merge: ``{"sha256": ..., "files": {name: size}}`` over every ``*.safetensors`` file's name, size, header and
    16 evenly spaced 64 KiB samples of its data (a few MiB read, whatever the model size). Another model, another
    fine-tune or a re-saved base changes it; the same files anywhere (copied, moved, through a symlink) do not.
    ``base`` may be a hub id found in the local Hugging Face cache; ``None`` when there are no local weights."""
    path = Path(base).expanduser()
    if not path.is_dir():
        try:
            path = Path(snapshot_download(str(base), local_files_only=True))
        except Exception:  # not a hub id, or not cached: nothing to fingerprint
            return None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    digest, sizes = hashlib.sha256(), {}
    try:
        for f in files:
            size = f.stat().st_size
            sizes[f.name] = size
            digest.update(f"{f.name}\0{size}\0".encode())
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                digest.update(head + fh.read(min(n, size)))
                start, span = 8 + n, max(0, size - 8 - n)
                for i in range(FINGERPRINT_SAMPLES):
                    fh.seek(start + span * i // FINGERPRINT_SAMPLES)
                    digest.update(fh.read(FINGERPRINT_CHUNK))
    except OSError:  # unreadable weights: whoever loads them reports it; a fingerprint is no reason to fail
        return None
    return {"sha256": digest.hexdigest(), "files": sizes}


def check_base_stage(run: dict, vora_base: bool, base) -> None:
    """A stage-2 run's checkpoint belongs on the merged VoRA model it was trained from, a stage-1 run's on a text
    LLM (``vora_run.json`` records the stage; older checkpoints without it are not checked)."""
    stage = run.get("stage")
    if stage == 2 and not vora_base:
        raise CheckpointError(f"the checkpoint is from a stage-2 run (trained on the merged VoRA model "
                              f"{run.get('base_llm')}), but the base {base} is a text LLM: use the VoRA model it was "
                              "trained from")
    if stage == 1 and vora_base:
        raise CheckpointError(f"the checkpoint is from a stage-1 run (trained on the text LLM {run.get('base_llm')}), "
                              f"but the base {base} is a merged VoRA model: use the LLM it was trained from")


# What a checkpoint's config must share with the base it is applied to (vora-merge checks the same fields).
LLM_ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads")
VORA_GEOMETRY_FIELDS = ("patch_size", "vision_embed_dim", "position_grid", "image_token_id")


def patch_embed_trained(run: dict) -> bool:
    """Whether the run trained the patch embedding (``vora_run.json``: ``trainable.patch_embed``; default yes)."""
    return (run.get("trainable") or {}).get("patch_embed", True) is not False


def check_same_geometry(config, base_config, what: str) -> None:
    """A stage-2 checkpoint's VoRAConfig must describe the VoRA base it was trained from."""
    for f in VORA_GEOMETRY_FIELDS:
        a, b = getattr(base_config, f, None), getattr(config, f, None)
        if a != b:
            raise CheckpointError(f"{what}: {f}={a!r} but the checkpoint's config.json has {f}={b!r}: wrong base?")
    for f in LLM_ARCH_FIELDS:
        a, b = getattr(base_config.text_config, f, None), getattr(config.text_config, f, None)
        if a is not None and b is not None and a != b:
            raise CheckpointError(f"{what}: text_config.{f}={a!r} but the checkpoint's text_config has {f}={b!r}: "
                                  "wrong base?")


def split_trainable(tensors: dict[str, torch.Tensor], source="vora_trainable.safetensors"):
    """``(vision_embed state dict, distill_heads state dict)`` with prefixes stripped; other keys refused."""
    vision, heads, bad = {}, {}, []
    for k, v in tensors.items():
        if k.startswith(VISION_PREFIX):
            vision[k[len(VISION_PREFIX):]] = v
        elif k.startswith(HEADS_PREFIX):
            heads[k[len(HEADS_PREFIX):]] = v
        else:
            bad.append(k)
    if bad:
        raise CheckpointError(f"{source}: unexpected keys {sorted(bad)[:5]} "
                              f"(expected only {VISION_PREFIX}* and {HEADS_PREFIX}*)")
    return vision, heads


def check_state_dict(expected: dict[str, tuple], got: dict[str, tuple], what: str, optional=frozenset()) -> None:
    """Refuse missing, unexpected or mis-shaped keys (``{name: shape}`` on both sides)."""
    missing = sorted(set(expected) - set(got) - set(optional))
    unexpected = sorted(set(got) - set(expected))
    shapes = [(k, tuple(got[k]), tuple(expected[k])) for k in sorted(set(expected) & set(got))
              if tuple(got[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:6]}{' …' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:6]}{' …' if len(unexpected) > 6 else ''}")
    for k, g, e in shapes[:6]:
        problems.append(f"shape mismatch for {k}: checkpoint has {list(g)}, model expects {list(e)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple]:
    """``{name: shape}`` of a safetensors file, no tensor read."""
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def read_trainable_weights(checkpoint: str | os.PathLike, expected: dict[str, tuple],
                           adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of a trainable-only checkpoint (peft adapter + ``vora_trainable.safetensors``) by the model's names
    (``language_model.*`` with the peft ``adapter_name``, ``vision_embed.*``, ``distill_heads.*``), every key and
    shape checked against ``expected`` (``{name: shape}``)."""
    checkpoint = str(checkpoint)
    lm_expected = {k: v for k, v in expected.items() if k.startswith("language_model.")}
    rest_expected = {k: v for k, v in expected.items() if not k.startswith("language_model.")}
    tensors = {}
    path = os.path.join(checkpoint, TRAINABLE_WEIGHTS)
    if not os.path.isfile(path):
        raise CheckpointError(f"{checkpoint}: {TRAINABLE_WEIGHTS} missing (not a VoRA training checkpoint?)")
    check_state_dict(rest_expected, read_safetensors_shapes(path), path)
    tensors.update(read_safetensors(path))
    adapter_path = os.path.join(checkpoint, ADAPTER_WEIGHTS)
    if lm_expected or os.path.isfile(adapter_path):
        if not os.path.isfile(adapter_path):
            raise CheckpointError(f"{checkpoint}: {ADAPTER_WEIGHTS} missing but the run trains LoRA weights")
        # peft stores keys without the adapter name: ...q_proj.lora_A.weight ↔ ...q_proj.lora_A.default.weight
        to_model = {}
        for k in lm_expected:
            short = k[len("language_model."):].replace(f".{adapter_name}.", ".")
            to_model[short] = k
        got = read_safetensors_shapes(adapter_path)
        check_state_dict({s: lm_expected[k] for s, k in to_model.items()}, got, adapter_path)
        for s, t in read_safetensors(adapter_path).items():
            tensors[to_model[s]] = t
    return tensors


def read_full_weights(checkpoint: str | os.PathLike, model,
                      heads_expected: dict[str, tuple] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a full-model checkpoint (``save_pretrained`` shards) for ``model`` (a VoRAForCausalLM, maybe
    ZeRO-3 partitioned), every key and shape checked; with ``heads_expected`` also the distillation heads from
    ``vora_trainable.safetensors`` (``distill_heads.*``)."""
    checkpoint = str(checkpoint)
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    single = os.path.join(checkpoint, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        paths = [os.path.join(checkpoint, x) for x in files]
    elif os.path.isfile(single):
        paths = [single]
    else:
        raise CheckpointError(f"{checkpoint}: no model.safetensors(.index.json) (not a full-model checkpoint?)")
    got = {}
    for p in paths:
        got.update(read_safetensors_shapes(p))
    # Parameters shared by several names (tied embeddings) are saved once.
    by_id: dict[int, list[str]] = {}
    shapes = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
        shapes[n] = param_shape(p)
    persistent_buffers = {n: tuple(b.shape) for n, b in model.state_dict().items() if n not in shapes}
    expected = dict(persistent_buffers)
    for names in by_id.values():
        present = [n for n in names if n in got]
        for n in present or names[:1]:
            expected[n] = shapes[n]
    check_state_dict(expected, got, f"{checkpoint} (full model)")
    tensors = {}
    for p in paths:
        tensors.update(read_safetensors(p))
    if heads_expected is not None:
        heads_path = os.path.join(checkpoint, TRAINABLE_WEIGHTS)
        if not os.path.isfile(heads_path):
            raise CheckpointError(f"{checkpoint}: {TRAINABLE_WEIGHTS} (distillation heads) missing")
        check_state_dict(heads_expected, read_safetensors_shapes(heads_path), heads_path)
        tensors.update(read_safetensors(heads_path))
    return tensors


def saved_world_size(checkpoint: str | os.PathLike) -> int | None:
    """How many ranks wrote a Trainer checkpoint: one writes ``rng_state.pth``, several ``rng_state_<rank>.pth``."""
    names = os.listdir(checkpoint)
    ranks = [int(m.group(1)) for n in names if (m := re.fullmatch(r"rng_state_(\d+)\.pth", n))]
    if ranks:
        return max(ranks) + 1
    return 1 if "rng_state.pth" in names else None


def load_trainable(
    directory: str | os.PathLike,
    *,
    base: str | None = None,
    dtype=None,
    attn_implementation: str | None = None,
    is_trainable: bool = False,
):
    """Rebuild the unmerged training model from a checkpoint: base (``base`` or ``vora_run.json``'s ``base_llm``)
    + peft LoRA + patch embedding, every key checked (no ``strict=False``).

    The base is a text LLM (stage 1) or a merged VoRA directory (stage 2). In stage 2 the patch embedding comes
    from the checkpoint when the run trained it (``vora_run.json``: ``trainable.patch_embed``), else from the base.
    A checkpoint of a frozen-LLM run has no adapter: the LLM is the base's as it is. A full-model checkpoint
    (stage-2 full fine-tuning) is loaded as it is.

    Returns ``(model, heads_state_dict)``; the heads' state dict is for training to restore.
    """
    directory = Path(directory)
    run = run_info(directory)
    kind = checkpoint_kind(directory, run)
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    trainable_path = directory / TRAINABLE_WEIGHTS
    if kind == "full":
        model = VoRAForCausalLM.from_pretrained(str(directory), **kwargs)
        heads = {}
        if trainable_path.is_file():
            heads = split_trainable(load_file(str(trainable_path)), str(trainable_path))[1]
        if not is_trainable:
            model.eval()
        return model, heads

    base = base or read_run(directory)["base_llm"]
    config = VoRAConfig.from_pretrained(str(directory))
    base_vision = None
    stage2 = base_is_vora(base)
    check_base_stage(run, stage2, base)
    if stage2:  # a merged VoRA model
        vora_base = VoRAForCausalLM.from_pretrained(str(base), **kwargs)
        check_same_geometry(config, vora_base.config, f"VoRA base {base}")
        llm = vora_base.language_model
        base_vision = vora_base.vision_embed.state_dict()
        del vora_base
    else:
        llm = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    impl = llm.config._attn_implementation
    config.text_config = llm.config
    model = VoRAForCausalLM(config, language_model=llm)
    model.set_attn_implementation(impl)

    vision, heads = split_trainable(load_file(str(trainable_path)), str(trainable_path))
    if base_vision is not None and (not vision or not patch_embed_trained(run)):
        vision = base_vision
        source = f"{base} (patch embedding of the VoRA base)"
    else:
        source = f"{trainable_path} (patch embedding)"
    expected = {k: tuple(v.shape) for k, v in model.vision_embed.state_dict().items()}
    check_state_dict(expected, {k: tuple(v.shape) for k, v in vision.items()}, source)
    model.vision_embed.load_state_dict(vision, strict=True)
    model.vision_embed.to(llm.dtype)

    if kind == "lora":
        lora_cfg = LoraConfig.from_pretrained(str(directory))
        lora_cfg.inference_mode = not is_trainable
        model.language_model = get_peft_model(llm, lora_cfg)
        adapter = load_file(str(directory / ADAPTER_WEIGHTS))
        result = set_peft_model_state_dict(model.language_model, adapter)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
        if unexpected or missing:
            raise CheckpointError(
                f"{directory / ADAPTER_WEIGHTS}: adapter does not fit {base}: "
                f"unexpected {unexpected[:5]}, missing {missing[:5]}"
            )
    if not is_trainable:
        model.eval()
    return model, heads


# --------------------------------------------------------------------------------------------
# durability and integrity of training checkpoints
# --------------------------------------------------------------------------------------------
MANIFEST = "vora_checkpoint.json"


def write_manifest(directory: str | os.PathLike, run_id: str, step: int) -> None:
    """``vora_checkpoint.json``: the run that wrote the checkpoint and every file's size, written last (after all
    ranks wrote theirs), so that :func:`validate_checkpoint` can tell a complete checkpoint of one run."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    body = {"run_id": run_id, "step": step, "files": files}
    (directory / MANIFEST).write_text(json.dumps(body, indent=1) + "\n")


def _check_safetensors(path: Path) -> None:
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_slice(k).get_shape()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({path.stat().st_size} bytes: {e}); "
                              "the checkpoint is damaged") from None


def validate_checkpoint(directory: str | os.PathLike) -> None:
    """Cheap integrity check of a training checkpoint (no tensor is read): every file its manifest lists is there
    with its size and from the same run as ``vora_run.json``, every JSON file parses, every safetensors header reads,
    DeepSpeed's ``latest`` names a directory that exists. Raises :class:`CheckpointError` naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    manifest = directory / MANIFEST
    run = None
    if manifest.is_file():  # older checkpoints have none: the checks below still apply
        body = read_json(manifest)
        for name, size in (body.get("files") or {}).items():
            f = directory / name
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (listed in {manifest}); the checkpoint is damaged")
            if f.stat().st_size != size:
                raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {size} when written; the checkpoint is damaged")
        run = run_info(directory)
        if body.get("run_id") and run.get("run_id") != body.get("run_id"):
            raise CheckpointError(f"{directory}: its files come from different runs ({RUN_FILE}: run "
                                  f"{run.get('run_id')}, {MANIFEST}: run {body.get('run_id')}); do not resume from it")
    for f in sorted(directory.glob("*.json")):
        try:
            json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{f}: not a readable JSON file ({f.stat().st_size} bytes: {e}); "
                                  "the checkpoint is damaged") from None
    if not (directory / "trainer_state.json").is_file():
        raise CheckpointError(f"{directory / 'trainer_state.json'}: missing; not a complete training checkpoint")
    for f in sorted(directory.glob("*.safetensors")):
        _check_safetensors(f)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set((read_json(index).get("weight_map") or {}).values())):
            if not (directory / shard).is_file():
                raise CheckpointError(f"{directory / shard}: missing (listed in {index}); the checkpoint is damaged")
    latest = directory / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag or not (directory / tag).is_dir():
            raise CheckpointError(f"{latest}: names {tag!r}, which is not a directory of the checkpoint; damaged")
    for f in directory.rglob("*"):
        if f.is_file() and f.stat().st_size == 0 and f.suffix in (".pt", ".pth", ".safetensors", ".json"):
            raise CheckpointError(f"{f}: empty file; the checkpoint is damaged")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` directories of ``output_dir``, newest (highest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]
