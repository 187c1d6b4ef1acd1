"""The embedded demo (scripts/demo.sh → python -m examples.demo): corpus, stand-ins, flags, and the --fast path end
to end (deepspeed launcher → vora-merge → Auto classes → generate) learning above its bar."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from examples.demo import corpus as C
from examples.demo import pretrain as P
from examples.demo import run as R
from vora.config import load_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "corpus"
    C.generate(str(out), n_train=60, n_heldout=12, text_fraction=0.1, seed=3, log=lambda m: None)
    return out


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_examples_wins_over_an_installed_top_level_examples_package(tmp_path):
    """lmms-eval's environment has a top-level `examples` package (tqdm-multiprocess ships one); from the
    repository root `python -m examples.demo.export_lmms_task` must still find ours."""
    fake = tmp_path / "site" / "examples"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = "import importlib.util; print(importlib.util.find_spec('examples.demo').origin)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(REPO / "examples" / "demo" / "__init__.py"), out.stderr


def test_corpus_is_llava_jsonl_with_text_only_rows_and_a_heldout_split(small_corpus):
    train = _rows(small_corpus / "train.jsonl")
    held = _rows(small_corpus / "heldout.jsonl")
    image_rows = [r for r in train if "image" in r]
    text_rows = [r for r in train if "image" not in r]
    assert len(image_rows) == 60 and len(text_rows) == 6
    for r in train:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert all(isinstance(t["value"], str) and t["value"] for t in conv)
        n_placeholders = sum(t["value"].count("<image>") for t in conv)
        if "image" in r:
            assert conv[0]["value"].startswith("<image>\n") and n_placeholders == 1
            # every image row needs the shape: a shape question or a caption (which names the shape)
            questions = " ".join(t["value"] for t in conv[0::2])
            assert "shape" in questions or any(q in questions for q in C.CAPTION_PROMPTS)
        else:
            assert n_placeholders == 0
    assert {r["attribute"] for r in held} == set(C.ATTRIBUTES)
    train_images = {r["image"] for r in image_rows}
    assert not train_images & {r["image"] for r in held}
    vocab = {"colour": set(C.COLOURS), "shape": set(C.SHAPES), "count": set(C.COUNT_WORDS.values()),
             "size": set(C.SIZES)}
    for r in held:
        assert r["answer"] in vocab[r["attribute"]] and r["conversations"][1]["value"] == r["answer"]


def test_images_vary_in_size_and_aspect_ratio(small_corpus):
    sizes = [Image.open(small_corpus / r["image"]).size for r in _rows(small_corpus / "images.jsonl")]
    assert all(40 <= w <= 84 and 40 <= h <= 84 for w, h in sizes)
    ratios = [w / h for w, h in sizes]
    assert min(ratios) < 0.8 and max(ratios) > 1.25
    labels = _rows(small_corpus / "images.jsonl")
    assert {r["count"] for r in labels} == {1, 2, 3} and {r["size"] for r in labels} == set(C.SIZES)


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_corpus_is_reused_and_byte_identical_for_a_seed(small_corpus, tmp_path):
    logs = []
    C.generate(str(small_corpus), n_train=60, n_heldout=12, text_fraction=0.1, seed=3, log=logs.append)
    assert logs and "reusing" in logs[0]
    # Built again from nothing: every file, images included (pixels, noise and PNG bytes), is the same.
    other = tmp_path / "again"
    C.generate(str(other), n_train=60, n_heldout=12, text_fraction=0.1, seed=3, log=lambda m: None)
    first, second = _file_hashes(small_corpus), _file_hashes(other)
    assert len(first) == 60 + 12 + 5
    differ = sorted(k for k in first if first[k] != second.get(k))
    assert first.keys() == second.keys() and not differ, f"{len(differ)} files differ, e.g. {differ[:5]}"
    # ... and another seed gives another corpus
    C.generate(str(tmp_path / "seed4"), n_train=60, n_heldout=12, text_fraction=0.1, seed=4, log=lambda m: None)
    third = _file_hashes(tmp_path / "seed4")
    assert third["train.jsonl"] != first["train.jsonl"]
    assert third["images/train_000000.png"] != first["images/train_000000.png"]


# The questions a reader expects, written out here (not derived from corpus.QUESTIONS): about one shape …
ONE_SHAPE = {
    "colour": {"What colour is it?", "What is its colour?", "Which colour do you see?"},
    "shape": {"What shape is it?", "Which shape is shown?", "What kind of shape is this?"},
    "count": {"How many are there?", "How many objects do you see?", "Count the objects."},
    "size": {"Is it small or large?", "How big is it?"},
}
# … and about two or three (size is not asked then: the shapes share one)
SEVERAL_SHAPES = {
    "colour": {"What colour are they?", "What is their colour?", "Which colour do you see?"},
    "shape": {"What shape are they?", "Which shape is shown?", "What kind of shape are these?"},
    "count": {"How many are there?", "How many objects do you see?", "Count the objects."},
}
# ("How many are there?" is neutral: whoever asks does not know the number)
SINGULAR_WORDS = {"it", "its", "this"}
PLURAL_WORDS = {"they", "their", "these"}


def _words(text: str) -> set[str]:
    return set(text.replace("?", " ").replace(".", " ").split())


def _check_caption(caption: str, label: dict) -> None:
    words = caption.split()
    if label["count"] == 1:
        assert words[:4] == ["a", label["size"], label["colour"], label["shape"]], caption
    else:
        assert words[:4] == [C.COUNT_WORDS[label["count"]], label["size"], label["colour"],
                             label["shape"] + "s"], caption
    assert words[-1] == ".", caption


def test_questions_and_answers_agree_with_the_number_of_shapes(tmp_path):
    out = tmp_path / "corpus"
    C.generate(str(out), n_train=300, n_heldout=40, text_fraction=0.1, seed=5, log=lambda m: None)
    labels = {r["image"]: r for r in _rows(out / "images.jsonl")}
    answers = {"colour": lambda lab: lab["colour"], "shape": lambda lab: lab["shape"],
               "count": lambda lab: C.COUNT_WORDS[lab["count"]], "size": lambda lab: lab["size"]}
    seen = {1: set(), 2: set()}
    rows = [r for r in _rows(out / "train.jsonl") if "image" in r] + _rows(out / "heldout.jsonl")
    for r in rows:
        label = labels[r["image"]]
        expected = ONE_SHAPE if label["count"] == 1 else SEVERAL_SHAPES
        conv = r["conversations"]
        for human, gpt in zip(conv[0::2], conv[1::2]):
            q, a = human["value"].replace("<image>\n", ""), gpt["value"]
            assert "theys" not in q
            if q in C.CAPTION_PROMPTS:
                _check_caption(a, label)
                continue
            kind = [k for k, qs in expected.items() if q in qs]
            assert kind, f"unexpected question {q!r} about {label['count']} shape(s)"
            assert a == answers[kind[0]](label), (q, a, label)
            wrong = PLURAL_WORDS if label["count"] == 1 else SINGULAR_WORDS
            assert not _words(q) & wrong, f"{q!r} asked about {label['count']} shape(s)"
            seen[min(label["count"], 2)].add(q)
    # every wording is used
    assert seen[1] == set().union(*ONE_SHAPE.values())
    assert seen[2] == set().union(*SEVERAL_SHAPES.values())
    # text-only rows: the scene in words (a caption that agrees with itself), then a question about it
    for r in _rows(out / "train.jsonl"):
        if "image" in r:
            continue
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert "theys" not in q
        if q.startswith("Repeat the description : "):
            assert q.split(" : ", 1)[1] == a
            continue
        caption, question = q.split("\n")
        several = caption.split()[0] != "a"
        assert question in set().union(*(SEVERAL_SHAPES if several else ONE_SHAPE).values()), q


def test_tokenizer_is_word_level_with_chat_template(small_corpus, tmp_path):
    from transformers import AutoTokenizer

    P.build_tokenizer(str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok("<image><image>\nWhat colour is it?", add_special_tokens=False)["input_ids"]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids[:2] == [image_id, image_id]
    assert tok.decode(ids[2:]) == "What colour is it?"
    # every word of the corpus is known (no [UNK])
    for r in _rows(small_corpus / "train.jsonl") + _rows(small_corpus / "heldout.jsonl"):
        for t in r["conversations"]:
            assert tok.unk_token_id not in tok(t["value"], add_special_tokens=False)["input_ids"], t["value"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_stand_in_is_rebuilt_when_its_corpus_changes(tmp_path):
    corpus, llm = tmp_path / "corpus", tmp_path / "llm"
    C.generate(str(corpus), n_train=8, n_heldout=2, seed=1, log=lambda m: None)
    logs = []
    P.pretrain_llm(str(llm), str(corpus), layers=1, hidden=32, steps=1, batch_size=2, log=logs.append)
    P.pretrain_llm(str(llm), str(corpus), layers=1, hidden=32, steps=1, batch_size=2, log=logs.append)
    assert "reusing" in logs[-1]
    # the same directory now holds another corpus (another seed): the LLM it learned the captions of is stale
    C.generate(str(corpus), n_train=8, n_heldout=2, seed=2, log=lambda m: None)
    logs.clear()
    P.pretrain_llm(str(llm), str(corpus), layers=1, hidden=32, steps=1, batch_size=2, log=logs.append)
    assert not any("reusing" in m for m in logs), logs


def test_a_stand_in_llm_that_cannot_answer_from_text_is_reported(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    C.generate(str(corpus), n_train=8, n_heldout=2, seed=1, log=lambda m: None)
    # what seed 1 measured: every kind learned from text except shape
    monkeypatch.setattr(P, "llm_text_accuracy", lambda *a,
                        **k: {"colour": 1.0, "shape": 0.18, "count": 1.0, "size": 1.0})
    logs = []
    P.pretrain_llm(str(tmp_path / "llm"), str(corpus), layers=1, hidden=32, steps=1, batch_size=2, log=logs.append)
    warning = [m for m in logs if "warning" in m]
    assert len(warning) == 1 and "shape 18%" in warning[0] and "colour" not in warning[0], logs


def test_flags_map_to_recipe_overrides_that_validate():
    args = R.parse_args(["--no-distill", "--attention", "causal", "--lora-layers", "2"])
    v = R.variant_from_args(args)
    assert v.ablation and v.name == "no-distill+causal+lora-2"
    assert v.overrides == ["distill=null", "model.attention_mode=causal", "lora.layers=2"]
    assert not R.variant_from_args(R.parse_args([])).ablation
    assert [x.name for x in R.compare_variants()] == ["vora", "no-distill", "causal"]
    assert R.parse_args(["--compare"]).compare_lora_layers is None
    variants = R.compare_variants(R.parse_args(["--compare", "--compare-lora-layers", "2"]).compare_lora_layers)
    assert [x.name for x in variants] == ["vora", "no-distill", "causal", "lora-2"]
    for x in variants:
        recipe = load_recipe(str(R.RECIPE), x.overrides)
        if x.name == "no-distill":
            assert recipe.distill is None
        if x.name == "lora-2":
            assert recipe.lora.layers == 2 and recipe.distill.num_blocks == 2
        if x.name == "causal":
            assert recipe.model.attention_mode == "causal"
    base = load_recipe(str(R.RECIPE))
    assert base.lora.layers == 4 and base.distill.num_blocks == 3 and base.model.attention_mode == "bidirectional"
    with pytest.raises(SystemExit):
        R.parse_args(["--compare", "--no-distill"])


def test_compare_table_and_steps_to_80():
    curve = [{"step": 100, "colour": 0.9, "shape": 0.5}, {"step": 200, "colour": 0.95, "shape": 0.85}]
    assert R.steps_to(curve) == 200 and R.steps_to(curve[:1]) is None
    acc = {"colour": 1.0, "shape": 0.9, "count": 0.8, "size": 0.7, "all": 0.85}
    rows = [
        {"label": "VoRA (default)", "accuracy": acc, "final_losses": {"lm_loss": 0.2, "distill_loss": 0.1},
         "steps_to_80": 200, "steps": 800, "train_seconds": 100.0},
        {"label": "--no-distill", "accuracy": acc, "final_losses": {"lm_loss": 0.3, "distill_loss": None},
         "steps_to_80": None, "steps": 800, "train_seconds": 90.0},
    ]
    text = R.print_compare(rows)
    assert "VoRA (default)" in text and "> 800" in text and "—" in text


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps: expected a positive number, got 0"),  # it used to run the preset's 1200 steps
    (["--lora-layers", "0"], "--lora-layers: expected a positive number, got 0"),
    (["--compare", "--compare-lora-layers", "-1"], "--compare-lora-layers: expected a positive number, got -1"),
    (["--threads", "0"], "--threads: expected a positive number, got 0"),
    (["--out", "FILE"], "exists and is not a directory"),  # it used to be a FileExistsError traceback
])
def test_bad_arguments_are_one_line_before_anything_runs(tmp_path, capsys, argv, needle):
    (tmp_path / "file").write_text("mine")
    argv = [str(tmp_path / "file") if a == "FILE" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        R.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vora-demo: error: ") and needle in err, err
    assert (tmp_path / "file").read_text() == "mine"


def test_several_seeds_print_their_spread_and_one_verdict():
    assert R.parse_args([]).seed == [0]
    assert R.parse_args(["--seed", "0", "1", "2"]).seed == [0, 1, 2]
    for bad in (["--seed", "1", "1"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            R.parse_args(bad)
    bars = {"colour": 0.90, "shape": 0.90}

    def result(seed, shape):
        acc = {"colour": 0.99, "shape": shape, "count": 0.9, "size": 0.95, "all": 0.93}
        return {"label": "VoRA (default)", "seed": seed, "accuracy": acc, "steps": 1000, "train_seconds": 300.0,
                "final_losses": {"lm_loss": 0.1, "distill_loss": 0.2}, "steps_to_80": 500,
                "failed_bars": R.check_bars(acc, bars)}

    good = [result(0, 0.947), result(1, 0.931), result(2, 0.962)]
    ok, line = R.verdict(good, bars)
    assert ok and line == ("demo: PASS — default configuration (seeds 0 1 2, worst seed): colour 99.0 % ≥ 90 %, "
                           "shape 93.1 % ≥ 90 %")
    ok, line = R.verdict([result(0, 0.87)], bars)
    assert not ok and line == "demo: FAIL — default configuration (seed 0): colour 99.0 % ≥ 90 %, shape 87.0 % < 90 %"
    ok, _ = R.verdict(good + [result(3, 0.899)], bars)
    assert not ok
    # each seed draws its own held-out questions: the caption gives their range, not the first seed's count
    counted = [dict(r, heldout_questions=n) for r, n in zip(good, (1135, 1141, 1135))]
    caption = R.compare_caption(counted, [0, 1, 2], 1200, R.PRESETS["full"])
    assert "seeds 0 1 2" in caption and "all 1135–1141 held-out questions" in caption
    assert "all 1135 held-out questions" in R.compare_caption(counted[:1], [0], 1200, R.PRESETS["full"])
    text = R.print_compare(good)
    assert "VoRA (default) seed 1" in text and text.splitlines()[-1].split()[:4] == ["spread", "(min–max)", "99–99",
                                                                                     "93–97"]


@pytest.mark.e2e
@pytest.mark.skipif(os.environ.get("VORA_SKIP_DEMO") == "1", reason="VORA_SKIP_DEMO=1")
def test_fast_demo_learns_end_to_end(tmp_path):
    """The whole pipeline on the small budget: corpus → stand-ins → deepspeed stage 1 → vora-merge →
    AutoModelForCausalLM(trust_remote_code) + generate. Colour must be learned well above chance (1/6)."""
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "examples.demo", "--fast", "--out", str(out)], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((out / "results" / "vora.json").read_text())
    acc = result["accuracy"]
    assert acc["colour"] >= 0.60, acc
    assert acc["all"] > 0.40, acc
    assert "held-out accuracy" in proc.stdout and "loss curve:" in proc.stdout
    # the console holds the demo's own account: library warnings and progress bars went to the logs
    console = proc.stdout + proc.stderr
    for noise in ("[WARNING]", "Setting accelerator", "Writing model shards", "it/s]"):
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    assert "Setting accelerator" in (out / "logs" / "demo.log").read_text()
    assert proc.stdout.strip().splitlines()[-1].startswith("demo: PASS — default configuration (seed 0): colour ")
    for stage in ("corpus", "stand-in LLM", "stand-in teacher", "stage 1 (vora)", "merge", "evaluation"):
        assert f"{stage} " in proc.stdout.split("time (seed 0):")[1], stage
    assert Path(result["loss_curve"]).is_file()
    merged = Path(result["merged"])
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["model_type"] == "vora" and "AutoModelForCausalLM" in cfg["auto_map"]
    assert not list(merged.glob("adapter_*")), "the merged model must carry no adapter"
    assert [p["step"] for p in result["learning_curve"]] == [40, 80, 120]
    print(f"fast demo: {wall:.0f} s, accuracy {acc}")


def test_compare_reuses_only_identical_finished_runs(tmp_path):
    preset = dict(R.PRESETS["fast"])
    v, w = R.compare_variants(2)[:2]
    fp = R.fingerprint(tmp_path, v, preset, 200, 0)
    assert fp == R.fingerprint(tmp_path, v, preset, 200, 0)
    assert len({fp, R.fingerprint(tmp_path, w, preset, 200, 0), R.fingerprint(tmp_path, v, preset, 300, 0),
                R.fingerprint(tmp_path, v, preset, 200, 1)}) == 4
    assert R.reusable(tmp_path, v, fp) is None
    (tmp_path / "results").mkdir()
    (tmp_path / "merged" / "vora").mkdir(parents=True)
    (tmp_path / "results" / "vora.json").write_text(json.dumps({"fingerprint": fp,
                                                                "merged": str(tmp_path / "merged" / "vora")}))
    assert R.reusable(tmp_path, v, fp) is not None
    assert R.reusable(tmp_path, v, R.fingerprint(tmp_path, v, preset, 300, 0)) is None
