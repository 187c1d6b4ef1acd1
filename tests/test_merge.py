"""vora-merge: exact folding (vs peft's merge_and_unload), stock names/shapes, output layout, atomicity,
clear refusals; training checkpoint save/load."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoProcessor

import vora  # noqa: F401  (registers the Auto classes)
from merge_tools import merge as merge_mod
from merge_tools.merge import MergeError, lora_scaling, merge, parse_size
from tests.vora_world import LORA_LAYERS, ROWS, build_world, make_batch
from vora.checkpoint import load_trainable

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def tied_world(tmp_path_factory):
    """Llama with tied embeddings (the base file has no lm_head.weight)."""
    return build_world(tmp_path_factory.mktemp("tied"), arch="llama", tie=True, max_shard_size="5GB")


@pytest.fixture(scope="module")
def merged(world):
    return AutoModelForCausalLM.from_pretrained(world.merged_dir).eval()


def read_all(directory) -> dict:
    index = json.loads((Path(directory) / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(Path(directory) / fname)))
    assert set(out) == set(index["weight_map"])
    return out


def base_tensors(llm_dir) -> dict:
    return load_file(str(Path(llm_dir) / "model.safetensors"))


# ------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------
def test_weights_equal_peft_merge_and_unload(world):
    got = read_all(world.merged_dir)
    want = world.reference_merged().state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-6, msg=k)
    # the adapter really changed the adapted weights, and only those
    base = base_tensors(world.llm_dir)
    changed = {k for k, v in base.items() if not torch.equal(got["language_model." + k], v)}
    assert changed and all(".layers.0." in k or ".layers.1." in k for k in changed)
    assert len(changed) == 7 * LORA_LAYERS


def test_merged_logits_and_greedy_equal_unmerged(world, merged):
    batch = make_batch(ROWS, "left", world.image_token_id, world.vocab)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        want = world.unmerged(**batch).logits
        got = merged(**batch).logits
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, generation_config=merged.generation_config)
    torch.testing.assert_close(merged.generate(**batch, **kw), world.unmerged.generate(**batch, **kw), atol=0, rtol=0)


def test_stock_names_shapes_and_parameter_count(world, merged):
    base = AutoModelForCausalLM.from_pretrained(world.llm_dir)
    lm = {k: tuple(v.shape) for k, v in merged.language_model.state_dict().items()}
    assert lm == {k: tuple(v.shape) for k, v in base.state_dict().items()}
    file_keys = {k.removeprefix("language_model."): tuple(v.shape) for k, v in read_all(world.merged_dir).items()
                 if k.startswith("language_model.")}
    assert file_keys == {k: tuple(v.shape) for k, v in base_tensors(world.llm_dir).items()}
    assert not any(".bias" in k for k in file_keys
                   if "proj" in k and "q_proj" not in k and "k_proj" not in k and "v_proj" not in k)
    n_base = sum(p.numel() for p in base.parameters())
    n_patch = sum(p.numel() for p in merged.vision_embed.parameters())
    assert sum(p.numel() for p in merged.parameters()) == n_base + n_patch
    assert world.summary["parameters"] == n_base + n_patch
    assert not any("lora" in k or "distill" in k or "teacher" in k for k in read_all(world.merged_dir))


def test_tied_embeddings(tied_world):
    w = tied_world
    files = read_all(w.merged_dir)
    assert "language_model.lm_head.weight" not in files
    m = AutoModelForCausalLM.from_pretrained(w.merged_dir).eval()
    assert m.language_model.lm_head.weight is m.language_model.model.embed_tokens.weight
    batch = make_batch(ROWS, "left", w.image_token_id, w.vocab)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(m(**batch).logits[valid], w.unmerged(**batch).logits[valid], atol=1e-4, rtol=1e-5)
    assert w.summary["shards"] == 1


def test_bfloat16_output_is_the_fp32_merge_rounded_once(world, tmp_path):
    out = tmp_path / "bf16"
    merge(world.ckpt_dir, out, dtype="bfloat16", max_shard_size="200KB", log=lambda m: None)
    got, ref = read_all(out), read_all(world.merged_dir)
    for k, v in ref.items():
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], v.to(torch.bfloat16)), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["text_config"]["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_scaling_rules():
    cfg = {"r": 8, "lora_alpha": 16}
    assert lora_scaling(cfg, "model.layers.0.mlp.up_proj", 8) == 2.0
    assert lora_scaling({**cfg, "use_rslora": True}, "model.layers.0.mlp.up_proj", 8) == 16 / 8**0.5
    pat = {**cfg, "rank_pattern": {"up_proj": 4}, "alpha_pattern": {"layers.0.mlp.up_proj": 1}}
    assert lora_scaling(pat, "model.layers.0.mlp.up_proj", 4) == 0.25
    assert lora_scaling(pat, "model.layers.0.mlp.down_proj", 8) == 2.0
    with pytest.raises(MergeError, match="rank 4 but adapter_config.json says r=8"):
        lora_scaling(cfg, "model.layers.0.mlp.down_proj", 4)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100KB") == 10**5


def test_rslora_adapter_folds_with_its_scale(world, tmp_path):
    ckpt = copy_ckpt(world, tmp_path)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    merge(ckpt, tmp_path / "out", dtype="float32", log=lambda m: None)
    got = read_all(tmp_path / "out")
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    key = "model.layers.1.self_attn.o_proj"
    a, b = adapter[f"base_model.model.{key}.lora_A.weight"], adapter[f"base_model.model.{key}.lora_B.weight"]
    s = cfg["lora_alpha"] / cfg["r"] ** 0.5
    want = base_tensors(world.llm_dir)[key + ".weight"] + s * b @ a
    torch.testing.assert_close(got[f"language_model.{key}.weight"], want, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# output layout and loading
# ------------------------------------------------------------------------------------------------
def test_output_layout(world):
    d = world.merged_dir
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == world.summary["shards"] > 1
    file_bytes = sum((d / s).stat().st_size for s in shards)
    assert index["metadata"]["total_size"] == file_bytes - sum(header_bytes(d / s) for s in shards)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "vora" and cfg["architectures"] == ["VoRAForCausalLM"]
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM", "AutoProcessor"}
    shipped = {p.name for p in (ROOT / "vora" / "model").glob("*.py")} - {"__init__.py"}  # the whole subpackage
    assert {p.name for p in d.glob("*.py")} == shipped >= {"modeling_vora.py", "mask.py", "processing_vora.py"}
    for f in shipped:
        assert (d / f).read_text() == (ROOT / "vora" / "model" / f).read_text()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
              "preprocessor_config.json", "generation_config.json", "vora_run.json"):
        assert (d / f).is_file(), f
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["pad_token_id"] is not None and gen["eos_token_id"] is not None
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".merged.")]  # no temp dirs left


def header_bytes(path):
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_processor_loads_and_agrees(world):
    proc = AutoProcessor.from_pretrained(world.merged_dir)
    assert type(proc).__name__ == "VoRAProcessor"
    assert proc.image_token_id == world.image_token_id and proc.image_processor.patch_size == 4
    assert proc.tokenizer.chat_template or proc.chat_template


def test_merge_without_saved_processor_uses_the_base_tokenizer(world, tmp_path):
    ckpt = copy_ckpt(world, tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        (ckpt / f).unlink(missing_ok=True)
    merge(ckpt, tmp_path / "out", log=lambda m: None)
    proc = AutoProcessor.from_pretrained(tmp_path / "out")
    assert proc.image_token_id == world.image_token_id and proc.image_processor.patch_size == 4
    assert (tmp_path / "out" / "chat_template.jinja").is_file() or proc.tokenizer.chat_template


# ------------------------------------------------------------------------------------------------
# refusals and atomicity
# ------------------------------------------------------------------------------------------------
def copy_ckpt(world, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(world.ckpt_dir, dst)
    return dst


def copy_base(world, tmp_path, edit) -> Path:
    dst = tmp_path / "base"
    shutil.copytree(world.llm_dir, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def edit_adapter(ckpt, edit):
    path = ckpt / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def assert_refused(world, tmp_path, match, ckpt=None, base=None):
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=match):
        merge(ckpt or world.ckpt_dir, out, base=str(base) if base else None, log=lambda m: None)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def test_refuses_adapter_shape_mismatch(world, tmp_path):
    ckpt = copy_ckpt(world, tmp_path)
    edit_adapter(ckpt, lambda t: t.update({f"{Q}.lora_A.weight": torch.zeros(8, 65)}))
    assert_refused(world, tmp_path,
                   r"shape mismatch for model\.layers\.0\.self_attn\.q_proj\.weight: base weight is \[64, 64\]",
                   ckpt=ckpt)


def test_refuses_adapter_keys_matching_no_base_weight(world, tmp_path):
    ckpt = copy_ckpt(world, tmp_path)

    def rename(t):
        for ab in "AB":
            t[f"base_model.model.model.layers.0.self_attn.qkv_proj.lora_{ab}.weight"] = t.pop(f"{Q}.lora_{ab}.weight")

    edit_adapter(ckpt, rename)
    assert_refused(world, tmp_path, r"'model\.layers\.0\.self_attn\.qkv_proj' match no base weight", ckpt=ckpt)


def test_refuses_unknown_adapter_keys_and_half_pairs(world, tmp_path):
    ckpt = copy_ckpt(world, tmp_path)
    edit_adapter(ckpt, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 4)}))
    assert_refused(world, tmp_path, "unexpected adapter key 'base_model.model.model.embed_tokens.lora_embedding_A'",
                   ckpt=ckpt)
    shutil.rmtree(ckpt)
    ckpt = copy_ckpt(world, tmp_path)
    edit_adapter(ckpt, lambda t: t.pop(f"{Q}.lora_B.weight"))
    assert_refused(world, tmp_path, r"module model\.layers\.0\.self_attn\.q_proj has no lora_B", ckpt=ckpt)


def test_refuses_missing_and_unexpected_base_weights(world, tmp_path):
    base = copy_base(world, tmp_path, lambda t: t.pop("model.norm.weight"))
    assert_refused(world, tmp_path, r"missing keys \(1\): \['model\.norm\.weight'\]", base=base)
    shutil.rmtree(base)
    base = copy_base(world, tmp_path, lambda t: t.update({"model.extra.weight": torch.zeros(3)}))
    assert_refused(world, tmp_path, r"unexpected keys \(1\): \['model\.extra\.weight'\]", base=base)
    shutil.rmtree(base)
    base = copy_base(world, tmp_path, lambda t: t.update({"model.norm.weight": torch.zeros(65)}))
    assert_refused(world, tmp_path,
                   r"shape mismatch for model\.norm\.weight: checkpoint has \[65\], model expects \[64\]", base=base)


def test_refuses_a_different_base_llm(world, tmp_path):
    from tests.vora_world import save_llm

    other = save_llm(tmp_path / "other", "qwen2", world.vocab, hidden=32)
    assert_refused(world, tmp_path, "hidden_size=32 but the checkpoint's text_config has hidden_size=64", base=other)


def test_refuses_bad_patch_embedding_and_missing_files(world, tmp_path):
    ckpt = copy_ckpt(world, tmp_path)
    t = load_file(str(ckpt / "vora_trainable.safetensors"))
    t["vision_embed.proj.weight"] = torch.zeros(64, 17)
    save_file(t, str(ckpt / "vora_trainable.safetensors"))
    assert_refused(world, tmp_path, r"shape mismatch for proj\.weight: checkpoint has \[64, 17\]", ckpt=ckpt)
    (ckpt / "adapter_model.safetensors").unlink()
    assert_refused(world, tmp_path, "lacks adapter_model.safetensors", ckpt=ckpt)


def test_refuses_dora_and_image_token_disagreement(world, tmp_path):
    ckpt = copy_ckpt(world, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["image_token_id"] = 5
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_refused(world, tmp_path, "maps '<image>' to id 7 but config.json has image_token_id=5", ckpt=ckpt)
    ac = json.loads((ckpt / "adapter_config.json").read_text())
    ac["use_dora"] = True
    (ckpt / "adapter_config.json").write_text(json.dumps(ac))
    assert_refused(world, tmp_path, "DoRA", ckpt=ckpt)


def test_existing_output_overwrite_and_cleanup_on_failure(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(world.merged_dir, out)  # a previous merge output: the only kind --overwrite replaces
    (out / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="already exists"):
        merge(world.ckpt_dir, out, log=lambda m: None)
    assert (out / "keep.txt").is_file()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merge_mod, "write_support_files", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        merge(world.ckpt_dir, out, overwrite=True, log=lambda m: None)
    assert (out / "keep.txt").is_file()  # the old output survives a failed overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # temp dir cleaned up
    monkeypatch.undo()
    merge(world.ckpt_dir, out, overwrite=True, log=lambda m: None)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_and_errors(world, tmp_path, capsys):
    out = tmp_path / "cli"
    assert merge_mod.main([str(world.ckpt_dir), "--output", str(out), "--dtype", "bfloat16", "--max-shard-size",
                           "100KB"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dtype"] == "bfloat16" and summary["shards"] > 1
    with pytest.raises(SystemExit, match="vora-merge: error: output .* already exists"):
        merge_mod.main([str(world.ckpt_dir), "--output", str(out)])
    with pytest.raises(SystemExit, match="lacks adapter_model.safetensors"):
        merge_mod.main([str(tmp_path), "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="cannot parse 'lots'"):
        merge_mod.main([str(world.ckpt_dir), "--output", str(tmp_path / "y"), "--max-shard-size", "lots"])
    with pytest.raises(SystemExit):  # argparse: --output is required
        merge_mod.main([str(world.ckpt_dir)])


# ------------------------------------------------------------------------------------------------
# training checkpoint format
# ------------------------------------------------------------------------------------------------
def test_checkpoint_files_and_strict_reload(world):
    d = world.ckpt_dir
    for f in ("adapter_model.safetensors", "adapter_config.json", "vora_trainable.safetensors", "config.json",
              "vora_run.json"):
        assert (d / f).is_file(), f
    with safe_open(str(d / "vora_trainable.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"vision_embed", "distill_heads"}
    run = json.loads((d / "vora_run.json").read_text())
    assert run["base_llm"] == str(world.llm_dir) and run["teacher"] and run["recipe"] == {"lr": 2e-4}
    model, heads = load_trainable(d, dtype=torch.float32)
    assert set(heads) == {"0.weight", "1.weight"}
    batch = make_batch(ROWS, "left", world.image_token_id, world.vocab)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, world.unmerged(**batch).logits)
