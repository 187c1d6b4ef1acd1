"""The demo's held-out questions as a local lmms-eval task, scored exactly like the demo's own evaluation.

    python -m examples.demo.export_lmms_task DEMO_OUT TASK_DIR      # DEMO_OUT or DEMO_OUT/corpus
    lmms-eval --model vora --model_args pretrained=MERGED_DIR --tasks vora_demo --include_path TASK_DIR

``TASK_DIR`` gets ``vora_demo.parquet`` (one row per held-out question, in the demo's order; the image is the
corpus PNG's bytes), ``vora_demo.yaml`` (``dataset_path: parquet`` + ``dataset_kwargs.data_files``, as lmms-eval
0.7.3 loads local tasks through ``datasets.load_dataset``) and ``utils.py`` (the functions below, for the YAML's
``!function`` tags). The question text and the scoring (first word of the answer == the truth) are the demo's
(:mod:`examples.demo.evaluate`), so lmms-eval's ``accuracy`` equals the demo's ``all`` on the same questions.

Needs only ``datasets`` (a vora dependency) to export; lmms-eval to run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path

from .evaluate import first_word, load_heldout

TASK = "vora_demo"
FILES = ("{task}.parquet", "{task}.yaml", "utils.py")

YAML = """\
# Written by `python -m examples.demo.export_lmms_task`: the vora demo's held-out questions.
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
# As the demo's evaluation: greedy, 3 new tokens, no stop string (the first word is compared).
generation_kwargs:
  max_new_tokens: 3
  do_sample: false
  temperature: 0
  until: []
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
  source: {source}
"""



# ------------------------------------------------------------------------------------------------
# task functions (referenced from the YAML through utils.py)
# ------------------------------------------------------------------------------------------------
def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"accuracy": float(first_word(results[0]) == doc["answer"])}


# utils.py holds these functions' source, so lmms-eval needs neither vora nor this example to import it.
UTILS = "\n\n".join(
    ["# Written by `python -m examples.demo.export_lmms_task`: the task functions of the vora demo's questions."]
    + [inspect.getsource(f) for f in (first_word, doc_to_visual, doc_to_text, process_results)]
)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
class ExportError(ValueError):
    pass


def find_corpus(demo_out: str | os.PathLike) -> Path:
    """DEMO_OUT/corpus or the corpus directory itself (it holds heldout.jsonl)."""
    path = Path(demo_out)
    for candidate in (path / "corpus", path):
        if (candidate / "heldout.jsonl").is_file():
            return candidate
    raise ExportError(
        f"{path}: no heldout.jsonl here or in {path / 'corpus'}: give the demo's output directory (scripts/demo.sh "
        f"writes demo_out/) or its corpus directory"
    )


def read_rows(corpus: Path) -> list[dict]:
    """The demo's held-out rows (examples.demo.evaluate.load_heldout: same order and question text), checked."""
    path = corpus / "heldout.jsonl"
    try:
        rows = load_heldout(str(corpus))
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ExportError(f"{path}: not a demo held-out file ({type(e).__name__}: {e}); re-run the demo's corpus step")
    for i, r in enumerate(rows, 1):
        missing = [k for k in ("image", "attribute", "answer") if k not in r]
        if missing:
            raise ExportError(f"{path}:{i}: row has no {', '.join(missing)}")
        if not (corpus / r["image"]).is_file():
            raise ExportError(f"{path}:{i}: image {corpus / r['image']} does not exist")
    if not rows:
        raise ExportError(f"{path}: no held-out questions")
    return rows


def export_demo_task(
    demo_out, task_dir, *, task: str = TASK, limit: int | None = None, overwrite: bool = False
) -> Path:
    """Write the task files into ``task_dir`` (created; with ``overwrite``, only the three task files are
    replaced, nothing else in the directory is touched). Files appear whole or not at all. Returns the YAML path."""
    import datasets

    corpus = find_corpus(demo_out)
    rows = read_rows(corpus)
    if limit is not None:
        if limit < 1:
            raise ExportError(f"--limit must be at least 1, got {limit}")
        rows = rows[:limit]
    task_dir = Path(task_dir).resolve()
    names = [f.format(task=task) for f in FILES]
    existing = [n for n in names if (task_dir / n).exists()]
    if existing and not overwrite:
        raise ExportError(f"{task_dir / existing[0]} exists: pass --overwrite to replace the task files")
    task_dir.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({
        "question_id": datasets.Value("int64"), "image": datasets.Image(), "image_path": datasets.Value("string"),
        "question": datasets.Value("string"), "attribute": datasets.Value("string"), "answer": datasets.Value("string"),
    })
    data = {
        "question_id": list(range(len(rows))),
        "image": [{"bytes": (corpus / r["image"]).read_bytes(), "path": None} for r in rows],
        "image_path": [r["image"] for r in rows],
        "question": [r["question"] for r in rows],
        "attribute": [r["attribute"] for r in rows],
        "answer": [r["answer"] for r in rows],
    }
    parquet = task_dir / names[0]
    with tempfile.TemporaryDirectory(dir=task_dir, prefix=".export.") as tmp:
        tmp = Path(tmp)
        datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp / names[0]))
        # JSON strings are YAML strings: paths with spaces or colons stay one scalar.
        (tmp / names[1]).write_text(YAML.format(task=task, parquet=json.dumps(str(parquet)),
                                                source=json.dumps(str(corpus.resolve()))))
        (tmp / names[2]).write_text(UTILS)
        for n in names:
            os.replace(tmp / n, task_dir / n)
    return task_dir / names[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m examples.demo.export_lmms_task",
        description="Export the vora demo's held-out questions as a local lmms-eval task (parquet + YAML).",
    )
    p.add_argument("demo_out", help="the demo's output directory (or its corpus/ directory)")
    p.add_argument("task_dir", help="directory for the task files (give it to lmms-eval --include_path)")
    p.add_argument("--task", default=TASK, help=f"task name (default {TASK})")
    p.add_argument("--limit", type=int, default=None, help="export only the first N questions")
    p.add_argument("--overwrite", action="store_true", help="replace existing task files of the same name")
    args = p.parse_args(argv)
    try:
        yaml_path = export_demo_task(args.demo_out, args.task_dir, task=args.task, limit=args.limit,
                                     overwrite=args.overwrite)
    except ExportError as e:
        print(f"export_lmms_task: error: {e}", file=sys.stderr)
        return 2
    n = sum(1 for _ in open(find_corpus(args.demo_out) / "heldout.jsonl"))
    n = min(n, args.limit) if args.limit is not None else n
    print(f"wrote {n} questions: {yaml_path} (+ parquet, utils.py)\n"
          f"run: lmms-eval --model vora --model_args pretrained=MERGED_DIR --tasks {args.task} "
          f"--include_path {yaml_path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
