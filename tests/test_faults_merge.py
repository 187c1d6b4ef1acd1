"""Faults on the merge and generate side, as a hostile user would cause them, through the real entry points
(``vora-merge`` / ``vora-generate`` mains, in process): path aliases that would make --overwrite delete the
checkpoint or the base, an adapter from another run, a base other than the one trained on, a killed merge's temp
directory, durability of the output, and vora-generate's limits and one-line errors."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vora  # noqa: F401  (registers the Auto classes)
from merge_tools import merge as merge_mod
from tests.helpers_data import make_image
from tests.vora_world import LORA_LAYERS, LORA_RANK, P, build_world, save_llm
from vora import checkpoint as ckpt
from vora.generate import build_inputs
from vora.generate import main as generate_main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("faults"))


def tree_hash(root: Path) -> dict:
    """{relative path: sha256} of every file under ``root`` (symlinks not followed)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def set_run(ckpt_dir: Path, **entries) -> None:
    path = ckpt_dir / ckpt.RUN_FILE
    run = json.loads(path.read_text())
    run.update(entries)
    path.write_text(json.dumps(run, indent=2))


def merge_cli(capsys, *argv) -> tuple[int, str, str]:
    """vora-merge in process: (exit status, stdout, stderr)."""
    try:
        code = merge_mod.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err + (code if isinstance(code, str) else "")


@pytest.fixture
def run_layout(world, tmp_path):
    """RUN/stage1/checkpoint-4 (the world's checkpoint, trained on B) and the base LLM B: copies the test may alias."""
    run_dir = tmp_path / "RUN"
    ck = run_dir / "stage1" / "checkpoint-4"
    shutil.copytree(world.ckpt_dir, ck)
    base = tmp_path / "B"
    shutil.copytree(world.llm_dir, base)
    set_run(ck, base_llm=str(base))
    (run_dir / "other").mkdir()
    (tmp_path / "X").mkdir()
    os.symlink(run_dir, tmp_path / "L")
    os.symlink(ck, tmp_path / "C")
    return tmp_path, ck, base


# ------------------------------------------------------------------------------------------------
# item 1: the output can never be, contain or lie inside an input, whatever its spelling
# ------------------------------------------------------------------------------------------------
ALIASES = [
    # (output spelling, --base spelling or None, which input it aliases)
    ("RUN/other/../stage1", None, "contains the checkpoint"),  # '..' through an existing directory
    ("RUN/missing/../stage1", None, "contains the checkpoint"),  # '..' through a directory that does not exist
    ("L/stage1", None, "contains the checkpoint"),  # symlinked parent
    ("L", None, "contains the checkpoint"),  # a symlink to the run directory itself
    ("C", None, "is the checkpoint"),  # a symlink to the checkpoint
    ("L/stage1/checkpoint-4/merged", None, "is inside the checkpoint"),
    ("X/../B", "B", "is the base LLM"),
    ("X/../B/sub", "B", "is inside the base LLM"),
    ("X/../B", "X/../B", "is the base LLM"),
    ("RUN/stage1/checkpoint-4/../../../B", None, "is the base LLM"),  # the recorded base, no --base given
]


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "no-overwrite"])
@pytest.mark.parametrize("output,base,what", ALIASES, ids=[a[0] for a in ALIASES])
def test_output_aliasing_an_input_is_refused_and_inputs_stay_intact(run_layout, capsys, output, base, what, overwrite):
    root, ck, real_base = run_layout
    before = {"run": tree_hash(root / "RUN"), "base": tree_hash(real_base)}
    argv = [ck, "--output", root / output] + (["--base", root / base] if base else [])
    argv += ["--overwrite"] if overwrite else []
    code, out, err = merge_cli(capsys, *argv)
    assert code not in (0, None), out
    line = err.strip()
    assert line.startswith("vora-merge: error: output ") and "\n" not in line
    assert what in line
    assert str(root / output) in line  # names both paths
    assert (str(ck) in line) or (str(real_base) in line) or (str(root / base) in line if base else False)
    assert {"run": tree_hash(root / "RUN"), "base": tree_hash(real_base)} == before
    assert (root / "L").is_symlink() and (root / "C").is_symlink()
    leftovers = [p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers


def test_overwrite_replaces_only_a_previous_merge_output(world, tmp_path, capsys):
    # a directory of the user's (not a merge output), a file, and a symlink to a merge output: all refused, untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    code, _, err = merge_cli(capsys, world.ckpt_dir, "--output", mine, "--overwrite")
    assert code not in (0, None) and "is not a previous vora-merge output" in err
    assert (mine / "notes.txt").read_text() == "precious"

    a_file = tmp_path / "file"
    a_file.write_text("precious")
    code, _, err = merge_cli(capsys, world.ckpt_dir, "--output", a_file, "--overwrite")
    assert code not in (0, None) and "is a file" in err and a_file.read_text() == "precious"

    link = tmp_path / "link"
    os.symlink(world.merged_dir, link)
    before = tree_hash(world.merged_dir)
    code, _, err = merge_cli(capsys, world.ckpt_dir, "--output", link, "--overwrite")
    assert code not in (0, None) and "is a symbolic link" in err
    assert link.is_symlink() and tree_hash(world.merged_dir) == before

    # a full fine-tuning run's final/ looks like a merged model but holds training results: refused
    full = tmp_path / "full"
    shutil.copytree(world.merged_dir, full)
    set_run(full, trainable={"llm": "full"}, merged=None)
    code, _, err = merge_cli(capsys, world.ckpt_dir, "--output", full, "--overwrite")
    assert code not in (0, None) and "is not a previous vora-merge output" in err

    # a previous merge output is replaced, and says what it was made from; so is an older one without the entry
    prev = tmp_path / "prev"
    shutil.copytree(world.merged_dir, prev)
    set_run(prev, merged=None)
    code, out, err = merge_cli(capsys, world.ckpt_dir, "--output", prev, "--overwrite")
    assert code == 0, err
    code, out, err = merge_cli(capsys, world.ckpt_dir, "--output", prev, "--overwrite", "--dtype", "bfloat16")
    assert code == 0, err
    merged = json.loads((prev / ckpt.RUN_FILE).read_text())["merged"]
    assert merged["checkpoint"] == str(world.ckpt_dir) and merged["dtype"] == "bfloat16"
    assert merged["base_fingerprint"] == ckpt.base_fingerprint(world.llm_dir)


def test_a_plain_text_llm_as_checkpoint_is_named_as_such(world, tmp_path, capsys):
    code, _, err = merge_cli(capsys, world.llm_dir, "--output", tmp_path / "out")
    assert code not in (0, None)
    assert f"{world.llm_dir} is not a VoRA training checkpoint" in err and "qwen2" in err and "--base" in err
    assert "full model" not in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# item 7: the pieces must belong together
# ------------------------------------------------------------------------------------------------
def foreign_adapter(world, directory: Path, layers: int, rank: int) -> None:
    """Replace the checkpoint's adapter (weights + adapter_config.json) by one of another run on the same base."""
    from vora import VoRAForCausalLM
    from vora.lora import add_lora

    model = VoRAForCausalLM.from_llm(str(world.llm_dir), image_token_id=world.image_token_id, patch_size=P,
                                     vision_embed_dim=16, position_grid=4, dtype=torch.float32)
    add_lora(model, num_layers=layers, rank=rank)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.language_model.save_pretrained(str(directory))


@pytest.mark.parametrize("recorded_in", ["config", "recipe"])
@pytest.mark.parametrize("layers,rank,field", [(LORA_LAYERS, 4, "r=4"), (1, LORA_RANK, "layers_to_transform=[0]")])
def test_adapter_of_another_run_is_refused(world, tmp_path, capsys, layers, rank, field, recorded_in):
    ck = tmp_path / "ckpt"
    shutil.copytree(world.ckpt_dir, ck)
    foreign_adapter(world, ck, layers, rank)
    if recorded_in == "recipe":  # what vora-train records; config.json's lora_* absent (hand-made checkpoints)
        set_run(ck, recipe={"lora": {"layers": LORA_LAYERS, "rank": LORA_RANK, "targets": ["q_proj", "k_proj",
                "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}})
        cfg = json.loads((ck / "config.json").read_text())
        for k in ("lora_layers", "lora_rank", "lora_targets"):
            cfg.pop(k, None)
        (ck / "config.json").write_text(json.dumps(cfg))
    code, out, err = merge_cli(capsys, ck, "--output", tmp_path / "out")
    assert code not in (0, None), out
    where = "recipe lora" if recorded_in == "recipe" else "lora_*"
    assert "adapter_config.json" in err and field in err and where in err
    assert not (tmp_path / "out").exists()


def test_base_other_than_the_recorded_one_is_refused_unless_forced(world, tmp_path, capsys):
    ck = tmp_path / "ckpt"
    shutil.copytree(world.ckpt_dir, ck)
    set_run(ck, base_fingerprint=ckpt.base_fingerprint(world.llm_dir))  # what vora-train records
    recorded = ckpt.base_fingerprint(world.llm_dir)["sha256"][:12]
    # another fine-tune of the same architecture: same config, same shapes, same file sizes, other weights
    other = save_llm(tmp_path / "other", "qwen2", world.vocab, tokenizer=world.processor.tokenizer, seed=5)
    assert (other / "model.safetensors").stat().st_size == (world.llm_dir / "model.safetensors").stat().st_size
    code, out, err = merge_cli(capsys, ck, "--output", tmp_path / "out", "--base", other)
    assert code not in (0, None)
    assert f"the base {other} (fingerprint " in err and f"{world.llm_dir} (fingerprint {recorded}" in err
    assert "same file sizes" in err and "--force-base" in err and not (tmp_path / "out").exists()
    assert f"recorded at training time: {world.llm_dir} (fingerprint {recorded})" in out  # printed side by side

    code, out, err = merge_cli(capsys, ck, "--output", tmp_path / "out", "--base", other, "--force-base")
    assert code == 0, err
    assert "warning: the base" in out and "merging anyway (--force-base)" in out

    # the same files elsewhere (copied) are the same base
    copy = tmp_path / "copy"
    shutil.copytree(world.llm_dir, copy)
    code, out, err = merge_cli(capsys, ck, "--output", tmp_path / "out2", "--base", copy)
    assert code == 0, err

    # the recorded base re-saved in place with other weights (no --base): refused too
    set_run(ck, base_llm=str(copy))
    shutil.copyfile(other / "model.safetensors", copy / "model.safetensors")
    code, out, err = merge_cli(capsys, ck, "--output", tmp_path / "out3")
    assert code not in (0, None) and f"the base {copy} (fingerprint" in err


def test_older_checkpoint_without_fingerprint_gets_a_notice(world, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(world.llm_dir, copy)
    assert "base_fingerprint" not in json.loads((world.ckpt_dir / ckpt.RUN_FILE).read_text())
    code, out, err = merge_cli(capsys, world.ckpt_dir, "--output", tmp_path / "out", "--base", copy)
    assert code == 0, err
    assert "records no base fingerprint (older checkpoint)" in out and str(world.llm_dir) in out and str(copy) in out


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_dirs_are_cleaned_live_ones_kept(world, tmp_path, capsys):
    host = ckpt._host()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        dead = tmp_path / f".out.tmp-{dead_pid()}@{host}-abcd1234"
        alive = tmp_path / f".out.tmp-{live.pid}@{host}-efgh5678"
        old_unknown = tmp_path / ".out.tmp-olds1234"  # older naming, untouched for two days
        fresh_unknown = tmp_path / ".out.tmp-news1234"  # older naming, recent: may be a live merge
        other_output = tmp_path / f".other.tmp-{dead_pid()}@{host}-ijkl9012"  # another output's: not ours to judge
        for d in (dead, alive, old_unknown, fresh_unknown, other_output):
            d.mkdir()
            (d / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        two_days_ago = os.path.getmtime(old_unknown) - 2 * 24 * 3600
        for p in (old_unknown / "model-00001-of-00002.safetensors", old_unknown):
            os.utime(p, (two_days_ago, two_days_ago))
        code, out, err = merge_cli(capsys, world.ckpt_dir, "--output", tmp_path / "out")
        assert code == 0, err
        assert not dead.exists() and not old_unknown.exists()
        assert alive.is_dir() and fresh_unknown.is_dir() and other_output.is_dir()
        assert f"removing {dead}" in out and f"removing {old_unknown}" in out
        assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    finally:
        live.kill()
        live.wait()


def test_output_files_and_directories_are_fsynced_before_the_rename(world, tmp_path, monkeypatch, capsys):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        renamed.append((str(src), str(dst), len(synced)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    code, _, err = merge_cli(capsys, world.ckpt_dir, "--output", out)
    assert code == 0, err
    (tmp, final, n_before), = [r for r in renamed if r[1] == str(out)]
    before = set(synced[:n_before])
    files = [str(Path(tmp) / p.relative_to(out)) for p in out.rglob("*")]
    assert files and all(f in before for f in files)  # every file on disk before it is published
    assert tmp in before  # the directory's entries too
    assert str(tmp_path) in synced[n_before:]  # and the rename itself


# ------------------------------------------------------------------------------------------------
# item 6: vora-generate
# ------------------------------------------------------------------------------------------------
def generate_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = generate_main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vora-generate: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def with_context(world, tmp_path, context: int) -> Path:
    """A copy of the merged model whose context (max_position_embeddings) is ``context``."""
    d = tmp_path / f"ctx{context}"
    shutil.copytree(world.merged_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = context
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_max_new_tokens_capped_at_the_context_left(world, tmp_path, capsys, monkeypatch):
    from vora.model.modeling_vora import VoRAForCausalLM

    img = tmp_path / "a.png"
    make_image(12, 16, seed=1).save(img)
    prompt_len = build_inputs(world.processor, [make_image(12, 16, seed=1)], "What is shown?")["input_ids"].shape[-1]
    model_dir = with_context(world, tmp_path, prompt_len + 3)
    asked = []
    real_generate = VoRAForCausalLM.generate

    def spy(self, *a, **k):
        asked.append(k["max_new_tokens"])
        return real_generate(self, *a, **k)

    monkeypatch.setattr(VoRAForCausalLM, "generate", spy)
    argv = ["--model", model_dir, "--image", img, "--prompt", "What is shown?", "--device", "cpu"]
    code, _, err = generate_cli(capsys, *argv, "--max-new-tokens", "1000000000")
    assert code == 0, err
    assert asked == [3]
    assert f"--max-new-tokens 1000000000 capped at 3 (context {prompt_len + 3}" in err
    code, _, err = generate_cli(capsys, *argv, "--max-new-tokens", "2")  # fits: no warning
    assert code == 0 and asked[-1] == 2 and "capped" not in err

    full = with_context(world, tmp_path, prompt_len)
    code, _, err = generate_cli(capsys, "--model", full, "--image", img, "--prompt", "What is shown?")
    assert_one_line_error(code, err, f"the prompt is {prompt_len} tokens", f"context is {prompt_len}")


def test_generate_refuses_bad_input_in_one_line(world, tmp_path, capsys):
    m = ["--model", world.merged_dir, "--device", "cpu"]
    code, _, err = generate_cli(capsys, *m, "--raw", "--prompt", "")
    assert_one_line_error(code, err, "nothing to generate from")

    thin = tmp_path / "thin.png"
    make_image(1, 250, seed=2).save(thin)
    code, _, err = generate_cli(capsys, *m, "--image", thin, "--prompt", "x")
    assert_one_line_error(code, err, f"image {thin}", "aspect ratio 250.0, above the limit 200")

    code, _, err = generate_cli(capsys, "--model", world.ckpt_dir, "--prompt", "x")
    assert_one_line_error(code, err, "is a training checkpoint", f"`vora-merge {world.ckpt_dir} --output DIR`")

    code, _, err = generate_cli(capsys, "--model", tmp_path / "nope", "--prompt", "x")
    assert_one_line_error(code, err, f"--model {tmp_path / 'nope'}: no such directory")
    assert "Repo id" not in err

    code, _, err = generate_cli(capsys, "--model", world.llm_dir, "--prompt", "x")
    assert_one_line_error(code, err, "'qwen2' model, not a VoRA model")

    for bad in ("2", "0", "-0.5", "nan"):
        code, _, err = generate_cli(capsys, *m, "--prompt", "x", "--temperature", "0.7", "--top-p", bad)
        assert_one_line_error(code, err, f"--top-p must be in (0, 1], got {float(bad)}")
    for bad in ("-1", "nan"):
        code, _, err = generate_cli(capsys, *m, "--prompt", "x", "--temperature", bad)
        assert_one_line_error(code, err, "--temperature must be >= 0")

    img = tmp_path / "a.png"
    make_image(12, 16, seed=1).save(img)
    # a chat prompt places the images itself: an <image> typed into it would be one image too many for the processor
    for flag in ("--prompt", "--system"):
        argv = [*m, "--image", img, "--prompt", "What is shown?", flag, "<image> <image> What is shown?"]
        code, _, err = generate_cli(capsys, *argv)
        assert_one_line_error(code, err, f"{flag} contains 2 <image> placeholder(s)", "--raw")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code, _, err = generate_cli(capsys, *m, "--image", bad, "--prompt", "x")
    assert_one_line_error(code, err, f"cannot read image {bad}: cannot identify image file")
    assert err.count("cannot read image") == 1, err


@pytest.mark.parametrize("device, needle", [
    ("gpu", "--device 'gpu' is not a device"),
    ("cuda", "--device 'cuda': torch sees no CUDA GPU here"),
    ("cuda:7", "--device 'cuda:7': torch sees no CUDA GPU here"),
    ("mps", "--device 'mps': MPS is not available here"),
    ("meta", "--device 'meta': runs on cpu, cuda or mps"),
])
def test_generate_refuses_a_device_torch_does_not_have_before_loading(world, capsys, monkeypatch, device, needle):
    """Without this, torch's own error came from inside ``.to(device)`` after the model loaded, as a traceback."""
    import vora.generate as gen

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(gen, "resolve_model", lambda m: pytest.fail("--device is checked before the model is read"))
    code, _, err = generate_cli(capsys, "--model", world.merged_dir, "--prompt", "x", "--device", device)
    assert_one_line_error(code, err, needle)


def test_generate_names_a_cuda_index_beyond_the_devices(world, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, _, err = generate_cli(capsys, "--model", world.merged_dir, "--prompt", "x", "--device", "cuda:2")
    assert_one_line_error(code, err, "--device 'cuda:2': there are 2 CUDA devices (cuda:0 … cuda:1)")
