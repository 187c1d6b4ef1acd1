"""Training recipes: a YAML file (+ ``key.sub=value`` overrides) → validated, plain dataclasses.

Sections (README "Recipe reference" lists every key; ``vora-train --print-config`` prints them):

* ``model``     — the LLM (stage 1: ``llm``) or a merged VoRA checkpoint (stage 2: ``vora``), patch embedding,
  image sizes, attention, dtype;
* ``lora``      — LoRA on the first N blocks (absent: no LoRA);
* ``distill``   — the frozen ViT teacher and the block map (absent: no distillation);
* ``data``      — training / evaluation sources, max length, packing, bad-sample policy, workers;
* ``trainable`` — what trains: ``llm: lora|full|frozen``, ``patch_embed: true|false``;
* ``train``     — Hugging Face ``TrainingArguments`` keys (plus ``resume_from_checkpoint: true|auto|path``).

Every key is checked when the recipe is loaded: an unknown or ill-typed key is a :class:`ConfigError` naming the
file (or the command line) and the dotted key, e.g.
``configs/x.yaml: train.learning_rat: unknown key (did you mean learning_rate?)``.

YAML is read with one change to the standard loader: ``2e-4`` is a float (plain YAML 1.1 reads it as a string).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from transformers import TrainingArguments

from .model.mask import FLEX_BLOCK_SIZE, attn_implementation_problem
from .typecheck import ConfigError, Where, build, check, describe, suggest

__all__ = [
    "ConfigError", "Recipe", "ModelSection", "LoraSection", "DistillSection", "DataSection", "SourceSpec",
    "TrainableSection", "load_recipe", "parse_overrides", "apply_overrides", "load_yaml", "resolve_path",
    "DEFAULT_LORA_TARGETS", "TRAIN_DEFAULTS", "SECTIONS",
]

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# `train` keys we default differently from TrainingArguments (applied when the recipe does not set them).
TRAIN_DEFAULTS: dict[str, Any] = {
    "report_to": "tensorboard",
    "logging_steps": 10,
    "save_steps": 500,
    "save_total_limit": 2,
}
# `train` keys that are ours to set (the trainer needs these values): an explicit other value is an error.
TRAIN_FORCED: dict[str, Any] = {"remove_unused_columns": False}


# ---------------------------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    pass


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def load_yaml(text_or_stream) -> Any:
    return yaml.load(text_or_stream, Loader=_Loader)


def yaml_problem(e: yaml.YAMLError) -> tuple[Any, str]:
    """PyYAML's multi-line message as (the problem's mark with 0-based ``line``/``column``, or None; the problem on
    one line)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if not problem:
        return mark, " ".join(str(e).split())
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        problem += f" ({context}" + (f" from line {cmark.line + 1}, column {cmark.column + 1})" if cmark else ")")
    return mark, problem


# ---------------------------------------------------------------------------------------------------- schema
def _doc(text: str, **kw):
    return field(metadata={"doc": text}, **kw)


@dataclass
class ModelSection:
    llm: str | None = _doc("stage 1: the text LLM to give eyes (local directory or hub id)", default=None)
    vora: str | None = _doc("stage 2: a merged VoRA checkpoint (config.json with model_type 'vora')", default=None)
    tokenizer: str | None = _doc("tokenizer / processor location (default: model.llm or model.vora)", default=None)
    patch_size: int | None = _doc(
        "pixels per patch side (default: the teacher's, else 14; stage 2: from the checkpoint)", default=None
    )
    vision_embed_dim: int | None = _doc(
        "width of the patch embedding (default: the teacher's width, else 1024)", default=None
    )
    position_grid: int | None = _doc(
        "side of the learned position grid (default: the teacher's grid, else 32)", default=None
    )
    min_pixels: int | None = _doc("smallest image area after resizing (default 3136 = 56²)", default=None)
    max_pixels: int | None = _doc("largest image area after resizing (default 200704 = 448²)", default=None)
    image_mean: list[float] | None = _doc("student pixel normalisation mean (default CLIP's)", default=None)
    image_std: list[float] | None = _doc("student pixel normalisation std (default CLIP's)", default=None)
    attention_mode: Literal["bidirectional", "causal"] | None = _doc(
        "attention inside image runs (default bidirectional)", default=None
    )
    attn_implementation: str | None = _doc(
        "flex_attention (fast on CUDA) | sdpa | eager (default: transformers' choice, sdpa); kernels that drop the "
        "image mask (flash_attention_*, hub kernels) are refused with bidirectional images or packing", default=None)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = _doc(
        "weights dtype at load (default: bfloat16 with train.bf16 under DeepSpeed, else float32)", default=None)
    init_patch_embed_from_teacher: bool = _doc(
        "copy the teacher's patch conv (and norm / positions) into the patch embedding", default=True
    )
    chunked_ce: bool = _doc(
        "LM loss from lm_head logits at label positions only, in chunks, never every position's full-vocabulary "
        "logits (false: transformers' own loss; same value)", default=True)


@dataclass
class LoraSection:
    layers: int = _doc("LoRA on the first N decoder blocks", default=None)
    rank: int = _doc("LoRA rank r (scale 1: alpha = r)", default=None)
    targets: list[str] = _doc("projection names", default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    _required = ("layers", "rank")


@dataclass
class DistillSection:
    teacher: str = _doc("teacher ViT: local dir / hub id (transformers) or a weights file (timm)", default=None)
    backend: Literal["transformers", "timm"] = _doc("how to load the teacher", default="transformers")
    timm_model: str | None = _doc("timm architecture name (backend timm)", default=None)
    timm_kwargs: dict = _doc("extra timm.create_model kwargs (backend timm)", default_factory=dict)
    num_blocks: int | None = _doc(
        "distil the first K LLM blocks (default: lora.layers, else min(teacher depth, LLM depth))", default=None
    )
    layer_map: list[list[int]] | None = _doc(
        "explicit [[llm_block, vit_block], ...] pairs, 1-based (default: spread evenly)", default=None
    )
    weight: float = _doc("λ: total = LM loss + λ · distillation loss", default=1.0)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = _doc(
        "teacher dtype (default: model dtype)", default=None
    )

    _required = ("teacher",)


@dataclass
class SourceSpec:
    """One data source: a ``data.sources`` entry of a recipe, and what ``VoRADataset`` reads."""

    _shorthand = "path"  # a recipe may list a source as its path alone

    path: str = _doc("file, glob or directory", default=None)
    image_root: str | None = _doc("directory image paths are relative to (default: the file's directory)", default=None)
    format: Literal["json", "jsonl", "parquet", "arrow", "hf"] | None = _doc("default: from the path", default=None)
    weight: float = _doc("per-epoch repeat factor", default=1.0)
    image_column: str | None = _doc("image column of table formats", default=None)
    name: str | None = _doc("label for logs", default=None)

    _required = ("path",)

    @classmethod
    def coerce(cls, spec: SourceSpec | dict | str) -> SourceSpec:
        """A spec, a ``{path, ...}`` dict or a path → a spec (the Python API's check; recipes are checked above)."""
        if isinstance(spec, str):
            spec = cls(path=spec)
        elif isinstance(spec, dict):
            unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"data source {spec.get('path')!r}: unknown keys {sorted(unknown)}")
            spec = cls(**spec)
        elif not isinstance(spec, cls):
            raise TypeError(f"data source must be a dict or a path, got {type(spec).__name__}")
        if spec.path is None:
            raise ValueError(f"data source without 'path': {spec}")
        return spec


@dataclass
class DataSection:
    sources: list[SourceSpec] = _doc("training sources (a path or a {path, ...} mapping each)", default=None)
    eval_sources: list[SourceSpec] | None = _doc("evaluation sources (optional)", default=None)
    max_length: int | None = _doc(
        "tokens per sample (longer ones are truncated; with packing: per packed row)", default=2048
    )
    packing: bool = _doc("pack the samples of a micro-batch into rows of max_length", default=False)
    pad_to_multiple_of: int | None = _doc(
        "round each batch's row length up to a multiple of this (default: 128 with model.attn_implementation "
        "flex_attention, so compiled kernels see few shapes; else none)", default=None)
    on_bad_sample: Literal["skip", "error"] = _doc("skip (count and report) or raise on a bad sample", default="skip")
    num_workers: int = _doc("DataLoader worker processes per rank", default=0)
    cache_dir: str | None = _doc(
        "Arrow cache for JSON sources (default $VORA_DATA_CACHE or ~/.cache/vora/data)", default=None
    )
    max_skip_fraction: float = _doc(
        "stop the run when more than this fraction of the samples read is skipped (0..1; 1: never)", default=0.5)

    _required = ("sources",)


@dataclass
class TrainableSection:
    llm: Literal["lora", "full", "frozen"] | None = _doc(
        "LLM weights: LoRA only, all, or none (default: lora with a lora section, else full)", default=None
    )
    patch_embed: bool = _doc("train the patch embedding", default=True)


@dataclass
class Recipe:
    model: ModelSection
    data: DataSection
    train: dict[str, Any]
    lora: LoraSection | None = None
    distill: DistillSection | None = None
    trainable: TrainableSection = field(default_factory=TrainableSection)
    # not keys: where the recipe came from, the keys set on the command line, and the resolved form (vora_run.json)
    source: str = ""
    resolved: dict = field(default_factory=dict)
    overridden: set = field(default_factory=set)

    def where(self, dotted: str) -> str:
        """``"<recipe file>: <dotted key>"``, or ``"command line: <dotted key>"`` when an override set it."""
        return f"{Where(self.source, self.overridden).where(dotted)}: {dotted}"

    @property
    def stage(self) -> int:
        return 2 if self.model.vora else 1

    @property
    def base(self) -> str:
        return self.model.vora or self.model.llm

    def to_dict(self) -> dict:
        return copy.deepcopy(self.resolved)


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "lora": LoraSection,
    "distill": DistillSection,
    "data": DataSection,
    "trainable": TrainableSection,
    "train": dict,
}
REQUIRED_SECTIONS = ("model", "data", "train")


# ---------------------------------------------------------------------------------------------------- overrides
def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["train.learning_rate=1e-4", "lora=null"]`` → ``[("train.learning_rate", 1e-4), ("lora", None)]``;
    values are YAML scalars (or flow collections: ``data.sources=[{path: a.jsonl}]``)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"command line: {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"command line: {item!r}: bad key {key!r}")
        try:
            parsed = load_yaml(value) if value.strip() else ""
        except yaml.YAMLError as e:
            mark, problem = yaml_problem(e)
            at = f" at character {mark.column + 1}" if mark is not None and mark.line == 0 else ""
            raise ConfigError(f"command line: {key}: cannot parse value {value!r} as YAML{at}: {problem}") from None
        out.append((key, parsed))
    return out


def apply_overrides(raw: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Set each dotted key in a copy of ``raw`` (creating mappings on the way; list items by index)."""
    raw = copy.deepcopy(raw) if raw is not None else {}
    for key, value in overrides:
        parts = key.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                idx = _index(part, node, where)
                node = node[idx]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"command line: {key}: {'.'.join(parts[:i]) or 'recipe'} is not a mapping")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, node, key)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"command line: {key}: {'.'.join(parts[:-1])} is not a mapping")
    return raw


def _index(part: str, node: list, where: str) -> int:
    if not re.fullmatch(r"-?\d+", part):
        raise ConfigError(f"command line: {where}: a list, index it with a number")
    idx = int(part)
    if not -len(node) <= idx < len(node):
        raise ConfigError(f"command line: {where}: index out of range (the list has {len(node)} items)")
    return idx


# ---------------------------------------------------------------------------------------------------- train
def _training_arguments_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def _check_train(raw: dict, ctx: Where) -> dict:
    fields = _training_arguments_fields()
    out = {}
    for key, value in raw.items():
        dotted = f"train.{key}"
        if key not in fields:
            raise ctx.error(dotted, f"unknown key{suggest(str(key), fields)} (train takes TrainingArguments fields)")
        if key == "resume_from_checkpoint":
            if value is None or isinstance(value, bool) or isinstance(value, str):
                out[key] = value
                continue
            raise ctx.error(dotted, f"expected true, false, 'auto' or a checkpoint path, got {describe(value)}")
        if key == "deepspeed" and isinstance(value, dict):
            out[key] = value
            continue
        if key in TRAIN_FORCED and value != TRAIN_FORCED[key]:
            raise ctx.error(dotted, f"must be {TRAIN_FORCED[key]!r} for VoRA training (the trainer relies on it)")
        tp = fields[key]
        enums = [a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):
            allowed = [m.value for e in enums for m in e]
            if value not in allowed:
                raise ctx.error(dotted, f"{value!r} is not one of {allowed}{suggest(value, allowed)}")
        checked = check(value, tp, ctx, dotted)
        # keep ints as ints where TrainingArguments takes float (warmup_steps: 100 = steps, 0.03 = ratio)
        keep_int = isinstance(value, int) and not isinstance(value, bool) and isinstance(checked, float)
        out[key] = value if keep_int else checked
    return out


# ---------------------------------------------------------------------------------------------------- paths
def resolve_path(path: str, recipe_file: str | None = None, must_exist: bool = True) -> str:
    """A relative path as given (cwd), else relative to the recipe's directory, else to the repository root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidates = []
    if recipe_file:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(recipe_file)), path))
    candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path))
    for c in candidates:
        if os.path.exists(c):
            return c
    if must_exist:
        raise FileNotFoundError(path)
    return path


# ---------------------------------------------------------------------------------------------------- load
def load_recipe(path: str | None, overrides: list[str] | list[tuple[str, Any]] | None = None,
                raw: dict | None = None) -> Recipe:
    """Read ``path`` (or take ``raw``), apply ``overrides`` and validate. Raises :class:`ConfigError`."""
    source = path or "<recipe>"
    if raw is None:
        if path is None:
            raise ConfigError("no recipe given")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such recipe file")
        with open(path) as f:
            try:
                raw = load_yaml(f)
            except yaml.YAMLError as e:
                mark, problem = yaml_problem(e)
                at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
                raise ConfigError(f"{path}{at}: not valid YAML: {problem}") from None
        raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the recipe must be a mapping of sections {list(SECTIONS)}")
    ov = overrides or []
    if ov and isinstance(ov[0], str):
        ov = parse_overrides(list(ov))
    raw = apply_overrides(raw, ov)
    ctx = Where(source, {k for k, _ in ov})

    for key in raw:
        if key not in SECTIONS:
            raise ctx.error(str(key),
                            f"unknown section{suggest(str(key), SECTIONS)} (sections: {', '.join(SECTIONS)})")
    for key, value in raw.items():
        if value is not None and not isinstance(value, dict):
            raise ctx.error(key, f"expected a mapping, got {describe(value)}")
    for key in REQUIRED_SECTIONS:
        if raw.get(key) is None:
            raise ctx.error(key, "required section missing")

    model = build(ModelSection, raw["model"], ctx, "model")
    data = build(DataSection, raw["data"], ctx, "data")
    lora = build(LoraSection, raw["lora"], ctx, "lora") if raw.get("lora") is not None else None
    distill = build(DistillSection, raw["distill"], ctx, "distill") if raw.get("distill") is not None else None
    trainable = build(TrainableSection, raw.get("trainable") or {}, ctx, "trainable")
    train = _check_train(raw["train"], ctx)

    # ---- cross-field rules
    if bool(model.llm) == bool(model.vora):
        raise ctx.error("model.llm", "set exactly one of model.llm (stage 1: a text LLM) or model.vora "
                                     "(stage 2: a merged VoRA checkpoint)")
    if model.vora:
        for key in ("patch_size", "vision_embed_dim", "position_grid"):
            if getattr(model, key) is not None:
                raise ctx.error(f"model.{key}", "comes from the VoRA checkpoint in stage 2 (model.vora); remove it")
    for key in ("patch_size", "vision_embed_dim", "position_grid", "min_pixels", "max_pixels"):
        v = getattr(model, key)
        if v is not None and v < 1:
            raise ctx.error(f"model.{key}", f"expected a positive number, got {v}")
    if model.min_pixels and model.max_pixels and model.min_pixels > model.max_pixels:
        raise ctx.error("model.min_pixels", f"{model.min_pixels} > model.max_pixels {model.max_pixels}")
    for key in ("image_mean", "image_std"):
        v = getattr(model, key)
        if v is not None and len(v) != 3:
            raise ctx.error(f"model.{key}", f"expected 3 values, got {len(v)}")

    if trainable.llm is None:
        trainable.llm = "lora" if lora is not None else "full"
    if trainable.llm == "lora" and lora is None:
        raise ctx.error("trainable.llm", "'lora' needs a lora section (layers, rank)")
    if lora is not None and trainable.llm != "lora":
        raise ctx.error("lora", f"a lora section with trainable.llm={trainable.llm!r}: remove one of them")
    if lora is not None:
        if lora.layers < 1:
            raise ctx.error("lora.layers", f"expected >= 1, got {lora.layers}")
        if not 1 <= lora.rank <= 1024:
            raise ctx.error("lora.rank", f"expected 1..1024, got {lora.rank}")
        if not lora.targets:
            raise ctx.error("lora.targets", "empty list")

    if distill is not None:
        if distill.backend == "timm" and not distill.timm_model:
            raise ctx.error("distill.timm_model", "required with backend 'timm'")
        if distill.layer_map is not None and distill.num_blocks is not None:
            raise ctx.error("distill.layer_map", "set either distill.layer_map or distill.num_blocks, not both")
        if distill.layer_map is not None:
            if not distill.layer_map:
                raise ctx.error("distill.layer_map", "empty list")
            for i, pair in enumerate(distill.layer_map):
                if len(pair) != 2 or min(pair) < 1:
                    raise ctx.error(f"distill.layer_map.{i}",
                                    f"expected [llm_block, vit_block] with 1-based blocks, got {pair}")
        if distill.num_blocks is not None and distill.num_blocks < 1:
            raise ctx.error("distill.num_blocks", f"expected >= 1, got {distill.num_blocks}")
        if distill.weight < 0:
            raise ctx.error("distill.weight", f"expected >= 0, got {distill.weight}")

    if not data.sources:
        raise ctx.error("data.sources", "empty list")
    if data.packing and not data.max_length:
        raise ctx.error("data.packing", "packing needs data.max_length (the capacity of a packed row)")
    if data.pad_to_multiple_of is not None and data.pad_to_multiple_of < 1:
        raise ctx.error("data.pad_to_multiple_of", f"expected >= 1, got {data.pad_to_multiple_of}")
    if data.pad_to_multiple_of is None and model.attn_implementation == "flex_attention":
        data.pad_to_multiple_of = FLEX_BLOCK_SIZE  # a whole number of flex tiles: one compiled shape per bucket
    needs_mask = (model.attention_mode or "bidirectional") == "bidirectional" or data.packing
    if model.attn_implementation is not None and needs_mask:  # images bidirectional, or samples kept apart
        problem = attn_implementation_problem(model.attn_implementation)
        if problem:
            raise ctx.error("model.attn_implementation", problem)
    if data.max_length is not None and data.max_length < 1:
        raise ctx.error("data.max_length", f"expected >= 1, got {data.max_length}")
    if data.num_workers < 0:
        raise ctx.error("data.num_workers", f"expected >= 0, got {data.num_workers}")
    if not 0.0 <= data.max_skip_fraction <= 1.0:
        raise ctx.error("data.max_skip_fraction", f"expected a fraction in 0..1, got {data.max_skip_fraction}")
    if "dataloader_num_workers" in train:
        raise ctx.error("train.dataloader_num_workers", "set data.num_workers instead")
    for i, s in enumerate(list(data.sources) + list(data.eval_sources or [])):
        if s.weight < 0:
            raise ctx.error(f"data.sources.{i}.weight", f"expected >= 0, got {s.weight}")

    if not train.get("output_dir"):
        raise ctx.error("train.output_dir", "required key missing")
    for key in ("gradient_checkpointing", "activation_checkpointing"):
        if key in train and "gradient_checkpointing" in train and "activation_checkpointing" in train:
            raise ctx.error("train.activation_checkpointing",
                            "set gradient_checkpointing or activation_checkpointing, not both")
    ds = train.get("deepspeed")
    if isinstance(ds, str):
        try:
            ds_path = resolve_path(ds, path)
        except FileNotFoundError:
            raise ctx.error("train.deepspeed", f"no such DeepSpeed config file: {ds}") from None
        try:
            with open(ds_path) as f:
                json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ctx.error("train.deepspeed", f"{ds_path}: not a JSON file: {e}") from None
        train["deepspeed"] = ds_path
    if train.get("fp16"):
        raise ctx.error("train.fp16", "fp16 is not supported (use bf16)")
    # TrainingArguments accepts these; the optimizer / DataLoader would reject them deep inside the run.
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if key in train and train[key] < 1:
            raise ctx.error(f"train.{key}", f"expected >= 1, got {train[key]}")
    for key in ("learning_rate", "weight_decay", "max_grad_norm"):
        if key in train and train[key] < 0:
            raise ctx.error(f"train.{key}", f"expected >= 0, got {train[key]}")

    resolved = {
        "model": _asdict(model),
        "lora": _asdict(lora) if lora else None,
        "distill": _asdict(distill) if distill else None,
        "data": _asdict(data),
        "trainable": _asdict(trainable),
        "train": copy.deepcopy(train),
    }
    return Recipe(model=model, data=data, train=train, lora=lora, distill=distill, trainable=trainable,
                  source=source, resolved=resolved, overridden={k for k, _ in ov})


def _asdict(obj) -> dict:
    return dataclasses.asdict(obj)


def reference() -> dict[str, list[tuple[str, str, str]]]:
    """``{section: [(key, default, doc), ...]}`` for the documentation."""
    out = {}
    for name, cls in SECTIONS.items():
        if cls is dict:
            continue
        rows = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            rows.append((f.name, json.dumps(default), f.metadata.get("doc", "")))
        out[name] = rows
    return out
