"""Training data: sources → records → encoded samples, with every skipped sample counted.

A source (:class:`vora.config.SourceSpec`) is a JSON / JSONL file of LLaVA (``conversations``) or OpenAI
(``messages``) records, or a Parquet / Arrow / ``save_to_disk`` table with those columns and an image column.
JSON files are streamed once into a memory-mapped Arrow cache, so no rank holds the corpus as Python objects.
:class:`VoRADataset` mixes the sources by per-epoch repeat factors (``weight``) and hands each record to
``vora.conversation.encode_conversation``. A sample that cannot be used is ``None`` (the collator drops it, nothing
replaces it), counted by reason in :class:`BadSampleCounter` (shared memory: DataLoader workers' counts reach the
main process); with ``on_bad_sample="error"`` it is a ``ValueError`` naming ``file:line``, the reason and the field
or path. Formats and reasons in detail: README, section Data.
"""

from __future__ import annotations

import bisect
import fcntl
import glob
import hashlib
import json
import logging
import math
import multiprocessing
import os
from multiprocessing.context import get_spawning_popen
from typing import Any, Iterable, Sequence

import datasets
import pyarrow as pa
import torch

from .config import SourceSpec
from .conversation import SampleError, encode_conversation
from .model.processing_vora import VoRAProcessor

logger = logging.getLogger(__name__)

# Fixed so that the shared counters can be plain integer slots.
SKIP_REASONS = (
    "malformed_json",  # a JSONL line (or JSON list element) that does not parse to an object
    "unknown_format",  # a record with neither `conversations` nor `messages`
    "bad_conversation",  # wrong types, unknown role, starts with the assistant, ...
    "no_assistant_turn",
    "placeholder_mismatch",  # number of <image> placeholders != number of images
    "image_missing",  # image file not found
    "image_unreadable",  # image file / bytes that PIL cannot decode
    "bad_image",  # decodes, but cannot be resized (e.g. absurd aspect ratio)
    "images_exceed_max_length",  # image tokens alone exceed max_length
    "no_labels_after_truncation",
    "template_error",  # the chat template output cannot be aligned with the turns
)
EVENTS = ("ok", "truncated")
_SLOTS = SKIP_REASONS + EVENTS

IMAGE_KEYS = ("images", "image", "frames")
LOG_FIRST_PER_REASON = 5


def _shared_array():
    # A lock made by the "spawn" context can be shared with workers started by fork, spawn or forkserver (one made
    # by the default fork context is refused by spawn/forkserver workers).
    return multiprocessing.get_context("spawn").Array("q", len(_SLOTS), lock=True)


class BadSampleCounter:
    """Counts of skipped samples by reason, plus ``ok`` and ``truncated`` events.

    The counts are kept in a ``multiprocessing.Array`` allocated by the process that builds the dataset; DataLoader
    workers inherit it (fork) or receive it while being started (spawn/forkserver), so their increments are seen by
    the main process. Counts are per process group rank; ``report(all_reduce=True)`` sums over ranks.
    """

    def __init__(self):
        self._arr = _shared_array()
        self._logged: dict[str, int] = {}
        self._detached = False

    def __getstate__(self):
        state = self.__dict__.copy()
        if get_spawning_popen() is None:
            # Pickled outside process start-up (e.g. deepcopy): a shared array cannot travel, the copy gets
            # private counts. Say so rather than losing counts silently.
            logger.warning("BadSampleCounter copied outside a worker start-up: the copy counts privately")
            state["_arr"] = list(self._arr[:])
            state["_detached"] = True
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if isinstance(self._arr, list):
            arr = _shared_array()
            arr[:] = self._arr
            self._arr = arr
        self._logged = {}

    def add(self, reason: str, where: str = "", detail: str = "", n: int = 1) -> None:
        idx = _SLOTS.index(reason) if reason in _SLOTS else None
        if idx is None:
            raise KeyError(f"unknown bad-sample reason {reason!r}")
        with self._arr.get_lock():
            self._arr[idx] += n
        if reason == "ok":
            return
        n = self._logged.get(reason, 0) + 1
        self._logged[reason] = n
        level = logging.WARNING if n <= LOG_FIRST_PER_REASON else logging.DEBUG
        verb = "truncated" if reason == "truncated" else f"skipped ({reason})"
        logger.log(level, "%s: %s: %s%s", where, verb, detail,
                   " (further ones logged at DEBUG)" if n == LOG_FIRST_PER_REASON else "")

    def counts(self) -> dict[str, int]:
        with self._arr.get_lock():
            vals = list(self._arr[:])
        return dict(zip(_SLOTS, vals))

    def reset(self) -> None:
        with self._arr.get_lock():
            self._arr[:] = [0] * len(_SLOTS)

    def report(self, reset: bool = False, all_reduce: bool = False, log: bool = True) -> dict[str, Any]:
        """``{"ok": n, "truncated": n, "skipped": {reason: n}, "skipped_total": n}``; logged at INFO (WARNING if
        anything was skipped). ``all_reduce`` sums over the ranks of an initialised ``torch.distributed`` group
        (every rank must call it)."""
        c = self.counts()
        if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            # NCCL reduces GPU tensors only; gloo CPU ones.
            nccl = torch.distributed.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            t = torch.tensor([c[k] for k in _SLOTS], dtype=torch.long, device=device)
            torch.distributed.all_reduce(t)
            c = dict(zip(_SLOTS, t.tolist()))
        skipped = {k: c[k] for k in SKIP_REASONS if c[k]}
        out = {"ok": c["ok"], "truncated": c["truncated"], "skipped": skipped, "skipped_total": sum(skipped.values())}
        if log:
            msg = "data: %d samples ok, %d truncated, %d skipped %s" % (
                out["ok"], out["truncated"], out["skipped_total"], skipped or "")
            logger.log(logging.WARNING if skipped else logging.INFO, msg)
        if reset:
            self.reset()
        return out


class DataError(ValueError):
    """The data cannot train the run: an empty source, or too many of its samples skipped (see
    ``data.max_skip_fraction``). The message names the file or the per-reason skip counts."""


def _default_cache_dir() -> str:
    return os.environ.get("VORA_DATA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vora", "data"))


def infer_format(path: str) -> str:
    p = path.rstrip("/")
    if os.path.isdir(p):
        if os.path.exists(os.path.join(p, "dataset_info.json")) or os.path.exists(os.path.join(p, "state.json")) \
                or os.path.exists(os.path.join(p, "dataset_dict.json")):
            return "hf"
        if glob.glob(os.path.join(p, "*.parquet")):
            return "parquet"
        if glob.glob(os.path.join(p, "*.arrow")):
            return "arrow"
        raise ValueError(f"data source {path}: cannot tell the format of this directory (set 'format')")
    low = p.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet"), (".arrow", "arrow")):
        if low.endswith(ext):
            return fmt
    if any(ch in p for ch in "*?[") and low.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"data source {path}: unknown format (expected .json, .jsonl, .parquet, .arrow or a "
                     f"save_to_disk directory; or set 'format')")


# --------------------------------------------------------------------------- JSON → Arrow cache
def _json_cache(path: str, fmt: str, cache_dir: str) -> tuple[str, dict]:
    """Build (once, under a file lock) a memory-mappable Arrow file of the records' JSON texts.
    Returns (arrow path, meta) with meta["bad"] = [[line, error], ...] (first 1000) and meta["n_bad"]."""
    st = os.stat(path)
    key = hashlib.sha1(f"v1|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{fmt}".encode()).hexdigest()[:16]
    os.makedirs(cache_dir, exist_ok=True)
    stem = os.path.basename(path).replace(".", "_")
    arrow_path = os.path.join(cache_dir, f"{stem}-{key}.arrow")
    meta_path = arrow_path + ".meta.json"
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return arrow_path, json.load(f)
    with open(arrow_path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(meta_path):
                with open(meta_path) as f:
                    return arrow_path, json.load(f)
            schema = pa.schema([("raw", pa.large_string()), ("line", pa.int64())])
            bad: list[list] = []
            n_bad = 0
            n_rows = 0
            tmp = arrow_path + f".tmp{os.getpid()}"
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                raws: list[str] = []
                lines: list[int] = []

                def flush():
                    if raws:
                        columns = [pa.array(raws, pa.large_string()), pa.array(lines, pa.int64())]
                        writer.write_batch(pa.record_batch(columns, schema=schema))
                        raws.clear()
                        lines.clear()

                for line_no, raw, err in _iter_json_records(path, fmt):
                    if err is not None:
                        n_bad += 1
                        if len(bad) < 1000:
                            bad.append([line_no, err])
                        continue
                    raws.append(raw)
                    lines.append(line_no)
                    n_rows += 1
                    if len(raws) >= 10000:
                        flush()
                flush()
            os.replace(tmp, arrow_path)
            meta = {"source": os.path.abspath(path), "rows": n_rows, "n_bad": n_bad, "bad": bad}
            with open(meta_path + ".tmp", "w") as f:
                json.dump(meta, f)
            os.replace(meta_path + ".tmp", meta_path)
            return arrow_path, meta
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _iter_json_records(path: str, fmt: str) -> Iterable[tuple[int, str | None, str | None]]:
    """Yield (line number or list index, record JSON text, error) for a JSONL or JSON-list file."""
    is_list = False
    if fmt == "json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        is_list = head.startswith(b"[")
    if is_list:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: malformed JSON file: {e.msg} (column {e.colno})") from e
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                yield i, None, f"element is {type(rec).__name__}, not an object"
            else:
                yield i, json.dumps(rec, ensure_ascii=False), None
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            s = line.strip()
            if not s:
                continue
            try:
                rec = json.loads(s)
            except json.JSONDecodeError as e:
                yield line_no, None, f"malformed JSON: {e.msg} (column {e.colno})"
                continue
            if not isinstance(rec, dict):
                yield line_no, None, f"line is a JSON {type(rec).__name__}, not an object"
                continue
            yield line_no, s, None


# --------------------------------------------------------------------------- sources
class SourceReader:
    """Reads the records of one :class:`SourceSpec`: its format and image root resolved, its rows memory-mapped."""

    def __init__(self, spec: SourceSpec, cache_dir: str):
        self.spec = spec
        self.path = spec.path
        self.fmt = spec.format or infer_format(spec.path)
        self.image_root = spec.image_root if spec.image_root is not None else (
            os.path.dirname(os.path.abspath(spec.path)) if not os.path.isdir(spec.path) else os.path.abspath(spec.path))
        self.bad_lines: list[list] = []
        self.n_bad_lines = 0
        if self.fmt in ("json", "jsonl"):
            arrow_path, meta = _json_cache(spec.path, self.fmt, cache_dir)
            self.table = datasets.Dataset.from_file(arrow_path)
            self.bad_lines, self.n_bad_lines = meta["bad"], meta["n_bad"]
            self.kind = "json"
            self.image_column = spec.image_column  # None: per record, the first of IMAGE_KEYS it has
        elif self.fmt in ("parquet", "arrow", "hf"):
            self.table = _load_table(spec.path, self.fmt, cache_dir)
            self.kind = "table"
            cols = self.table.column_names
            self.image_column = spec.image_column or next((c for c in IMAGE_KEYS if c in cols), None)
            if spec.image_column and spec.image_column not in cols:
                raise ValueError(f"data source {spec.path}: image_column {spec.image_column!r} not in columns {cols}")
            if self.image_column is not None:
                self.table = _no_decode(self.table, self.image_column)
        else:
            raise ValueError(f"data source {spec.path}: unknown format {self.fmt!r}")

    def __len__(self) -> int:
        return len(self.table)

    def loc(self, line: int) -> str:
        """``file:line`` for JSONL, ``file[index]`` for a JSON list."""
        return f"{self.path}[{line}]" if self._is_list() else f"{self.path}:{line}"

    def get(self, row: int) -> tuple[dict, str]:
        r = self.table[row]
        if self.kind == "json":
            return json.loads(r["raw"]), self.loc(r["line"])
        return r, f"{self.path} row {row}"

    def _is_list(self) -> bool:
        if not hasattr(self, "_list_flag"):
            self._list_flag = False
            if self.fmt == "json":
                with open(self.path, "rb") as f:
                    self._list_flag = f.read(4096).lstrip().startswith(b"[")
        return self._list_flag


def _load_table(path: str, fmt: str, cache_dir: str):
    if fmt == "hf":
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" in ds:
                ds = ds["train"]
            elif len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                raise ValueError(f"data source {path}: DatasetDict with splits {list(ds)}; point at one split")
        return ds
    if fmt == "parquet":
        files = sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else sorted(glob.glob(path))
        if not files:
            raise ValueError(f"data source {path}: no parquet files")
        return datasets.Dataset.from_parquet(files, cache_dir=cache_dir)
    files = sorted(glob.glob(os.path.join(path, "*.arrow"))) if os.path.isdir(path) else [path]
    parts = [datasets.Dataset.from_file(f) for f in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _no_decode(ds, col: str):
    """Keep 🤗 Image columns as {bytes, path} so decoding errors are ours to classify."""
    feat = ds.features.get(col)
    if isinstance(feat, datasets.Image) and feat.decode:
        return ds.cast_column(col, datasets.Image(decode=False))
    inner = getattr(feat, "feature", None)
    if isinstance(feat, (datasets.List, datasets.Sequence)) and isinstance(inner, datasets.Image) and inner.decode:
        return ds.cast_column(col, datasets.List(datasets.Image(decode=False)))
    return ds


# --------------------------------------------------------------------------- records
def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


def _maybe_json(v, field: str):
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise SampleError("bad_conversation", f"field {field!r} is a string that is not JSON: {e.msg}") from e
    return v


def read_record(rec: dict, image_column: str | None) -> dict[str, Any]:
    """One record → the keyword arguments of ``encode_conversation`` it gives: ``messages`` (from ``conversations``
    or ``messages``), ``images`` (the references in ``image_column``, default the first of ``IMAGE_KEYS`` the record
    has) and the names of both fields. Raises :class:`SampleError` for a record of neither schema."""
    if rec.get("conversations") is not None:
        field = "conversations"
    elif rec.get("messages") is not None:
        field = "messages"
    else:
        raise SampleError("unknown_format",
                          f"record has neither 'conversations' nor 'messages' (keys: {sorted(rec)[:8]})")
    images_field = image_column or next((k for k in IMAGE_KEYS if rec.get(k) is not None), "images")
    return {"messages": _maybe_json(rec[field], field), "field": field,
            "images": _as_list(rec.get(images_field)), "images_field": images_field}


# --------------------------------------------------------------------------- dataset
class VoRADataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded samples over weighted sources.

    ``VoRADataset(sources, processor, max_length=None, on_bad_sample="skip", cache_dir=None)``

    ``dataset[i]`` → ``{"input_ids", "labels", "pixel_values", "image_grid_hw"}`` or ``None`` (skipped, counted
    in ``dataset.stats``). ``on_bad_sample="error"`` raises ``ValueError("<file:line>: <reason>: <detail>")``
    instead (also at construction for malformed JSON lines).
    """

    def __init__(
        self,
        sources: Sequence[SourceSpec | dict | str],
        processor: VoRAProcessor,
        max_length: int | None = None,
        on_bad_sample: str = "skip",
        cache_dir: str | None = None,
    ):
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
        if not sources:
            raise ValueError("no data sources")
        self.processor = processor
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.stats = BadSampleCounter()
        cache_dir = cache_dir or _default_cache_dir()
        self.sources = [SourceReader(SourceSpec.coerce(s), cache_dir) for s in sources]
        self._sizes = []
        for src in self.sources:
            if src.spec.weight < 0:
                raise ValueError(f"data source {src.path}: negative weight")
            self._sizes.append(int(round(src.spec.weight * len(src))))
            if src.n_bad_lines:
                first_line, first_err = src.bad_lines[0]
                if on_bad_sample == "error":
                    raise ValueError(f"{src.loc(first_line)}: malformed_json: {first_err} "
                                     f"({src.n_bad_lines} bad lines in this file)")
                for line, err in src.bad_lines:
                    self.stats.add("malformed_json", src.loc(line), err)
                # Lines beyond the first 1000 recorded in the cache's side file are counted without a location.
                extra = src.n_bad_lines - len(src.bad_lines)
                if extra > 0:
                    self.stats.add("malformed_json", src.path, f"{extra} further malformed lines", n=extra)
        self._cum = [0]
        for n in self._sizes:
            self._cum.append(self._cum[-1] + n)
        logger.info("data: %s", ", ".join(f"{s.path} ({len(s)} rows × {s.spec.weight:g} → {n})"
                                          for s, n in zip(self.sources, self._sizes)))

    def __len__(self) -> int:
        return self._cum[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """Global index → (source index, row in the source), following the repeat factors."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        s = bisect.bisect_right(self._cum, index) - 1
        k = index - self._cum[s]
        n_rows = len(self.sources[s])
        full = int(math.floor(self.sources[s].spec.weight)) * n_rows
        if k < full:
            return s, k % n_rows
        rem = self._sizes[s] - full
        return s, (k - full) * n_rows // rem

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        s, row = self.locate(index)
        src = self.sources[s]
        where = f"{src.path} row {row}"
        try:
            rec, where = src.get(row)
            enc = encode_conversation(self.processor, **read_record(rec, src.image_column),
                                      max_length=self.max_length, image_root=src.image_root)
        except SampleError as e:
            if self.on_bad_sample == "error":
                raise ValueError(f"{where}: {e.reason}: {e}") from e
            self.stats.add(e.reason if e.reason in SKIP_REASONS else "bad_conversation", where, str(e))
            return None
        if enc["counts"].get("truncated"):
            self.stats.add("truncated", where, f"cut to {len(enc['input_ids'])} tokens (max_length={self.max_length})")
        self.stats.add("ok")
        return {k: enc[k] for k in ("input_ids", "labels", "pixel_values", "image_grid_hw")}

    def report(self, **kw) -> dict[str, Any]:
        """Shortcut for ``self.stats.report(**kw)``."""
        return self.stats.report(**kw)


__all__ = ["VoRADataset", "SourceReader", "BadSampleCounter", "DataError", "SampleError", "SKIP_REASONS", "read_record",
           "infer_format"]
