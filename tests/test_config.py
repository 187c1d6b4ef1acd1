"""Recipes: YAML → validated dataclasses; errors name the file (or command line) and the dotted key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers_data import MINIMAL_RECIPE as MINIMAL
from tests.helpers_data import write_recipe as write
from vora.config import ConfigError, apply_overrides, load_recipe, load_yaml, parse_overrides, reference

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def test_minimal_recipe_and_defaults(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.stage == 1 and r.base == "/models/llm"
    assert r.train["learning_rate"] == 2e-4 and isinstance(r.train["learning_rate"],
                                                           float)  # YAML 1.1 would give '2e-4'
    assert r.trainable.llm == "lora" and r.trainable.patch_embed is True
    assert r.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert r.distill is None
    assert [s.path for s in r.data.sources] == ["/data/a.jsonl", "/data/b.jsonl"] and r.data.sources[1].weight == 2.0
    assert r.data.max_length == 2048 and r.data.on_bad_sample == "skip"
    assert r.to_dict()["lora"]["rank"] == 4


@pytest.mark.parametrize("text, overrides, message", [
    (MINIMAL, ["train.learning_rat=1e-4"],
     "command line: train.learning_rat: unknown key (did you mean learning_rate?)"),
    (MINIMAL + "lorra: {rank: 3}\n", [], "x.yaml: lorra: unknown section (did you mean lora?)"),
    (MINIMAL.replace("rank: 4", "rnak: 4"), [], "x.yaml: lora.rnak: unknown key (did you mean rank?)"),
    (MINIMAL, ["data.sources.1.imge_root=/x"],
     "command line: data.sources.1.imge_root: unknown key (did you mean image_root?)"),
    (MINIMAL, ["lora.rank=abc"], "command line: lora.rank: expected int, got a string ('abc')"),
    (MINIMAL, ["train.max_steps=2.5"], "command line: train.max_steps: expected int, got a number (2.5)"),
    (MINIMAL, ["train.bf16=maybe"], "command line: train.bf16: expected bool, got a string ('maybe')"),
    (MINIMAL, ["train.lr_scheduler_type=cosin"], "train.lr_scheduler_type: 'cosin' is not one of"),
    (MINIMAL, ["train.optim=adamw"], "train.optim: 'adamw' is not one of"),
    (MINIMAL, ["model.attention_mode=full"], "command line: model.attention_mode: expected 'bidirectional' | 'causal'"),
    (MINIMAL, ["data.on_bad_sample=ignore"], "data.on_bad_sample: expected 'skip' | 'error'"),
    (MINIMAL.replace("layers: 2, ", ""), [], "x.yaml: lora.layers: required key missing"),
    (MINIMAL, ["train.output_dir=null"], "train.output_dir: required key missing"),
    (MINIMAL, ["model.vora=/x"], "model.llm: set exactly one of model.llm"),
    (MINIMAL, ["trainable.llm=full"], "lora: a lora section with trainable.llm='full'"),
    (MINIMAL, ["lora=null", "trainable.llm=lora"], "trainable.llm: 'lora' needs a lora section"),
    (MINIMAL, ["distill.backend=timm", "distill.teacher=/t.safetensors"],
     "distill.timm_model: required with backend 'timm'"),
    (MINIMAL, ["distill.teacher=/t", "distill.num_blocks=2", "distill.layer_map=[[1, 2]]"],
     "set either distill.layer_map or distill.num_blocks"),
    (MINIMAL, ["distill.teacher=/t", "distill.layer_map=[[1, 2, 3]]"],
     "distill.layer_map.0: expected [llm_block, vit_block]"),
    (MINIMAL, ["data.packing=true", "data.max_length=null"], "data.packing: packing needs data.max_length"),
    (MINIMAL, ["train.deepspeed=ds_configs/zero9.json"], "train.deepspeed: no such DeepSpeed config file"),
    (MINIMAL, ["train.remove_unused_columns=true"], "train.remove_unused_columns: must be False"),
    (MINIMAL, ["train.dataloader_num_workers=4"], "train.dataloader_num_workers: set data.num_workers instead"),
    (MINIMAL, ["data.sources.7.path=/x"], "command line: data.sources.7: index out of range"),
    (MINIMAL, ["train.resume_from_checkpoint=3"],
     "train.resume_from_checkpoint: expected true, false, 'auto' or a checkpoint path"),
    (MINIMAL, ["lora.rank"], "expected key.sub=value"),
    ("model: [1]\n", [], "x.yaml: model: expected a mapping"),
    ("- 1\n", [], "the recipe must be a mapping"),
])
def test_errors_name_file_and_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text), overrides)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("text, overrides, message", [
    ("model:\n  llm: [a\n", [], "x.yaml:3:1: not valid YAML: expected ',' or ']', but got '<stream end>' "
                                 "(while parsing a flow sequence from line 2, column 8)"),
    ("model:\n\tllm: x\n", [], "x.yaml:2:1: not valid YAML: found character '\\t' that cannot start any token"),
    (MINIMAL, ["model.llm=[a"], "command line: model.llm: cannot parse value '[a' as YAML at character 3: expected ',' "
                                "or ']'"),
    (MINIMAL, ["model.llm=a: b: c"], "command line: model.llm: cannot parse value 'a: b: c' as YAML at character 5: "
                                     "mapping values are not allowed here"),
])
def test_yaml_syntax_errors_are_one_line_with_the_position(tmp_path, text, overrides, message):
    """PyYAML's message spans four lines (problem, mark, snippet, caret): ours is one, with file:line:column."""
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text), overrides)
    assert "\n" not in str(e.value) and message in str(e.value), str(e.value)


def test_stage2_rules(tmp_path):
    stage2 = MINIMAL.replace("model: {llm: /models/llm}",
                             "model: {vora: /models/merged}").replace("lora: {layers: 2, rank: 4}\n", "")
    r = load_recipe(write(tmp_path, stage2))
    assert r.stage == 2 and r.base == "/models/merged" and r.trainable.llm == "full"
    r = load_recipe(write(tmp_path, stage2),
                    ["trainable.llm=frozen", "trainable.patch_embed=true", "model.max_pixels=50176"])
    assert r.trainable.llm == "frozen" and r.model.max_pixels == 50176
    with pytest.raises(ConfigError, match="model.patch_size: comes from the VoRA checkpoint"):
        load_recipe(write(tmp_path, stage2), ["model.patch_size=16"])


def test_overrides_yaml_scalars_lists_and_sections():
    assert parse_overrides(["a.b=1e-4", "a.c=true", "a.d=[1, 2]", "a.e=null", "a.f=text", "a.g={x: 1}"]) == [
        ("a.b", 1e-4), ("a.c", True), ("a.d", [1, 2]), ("a.e", None), ("a.f", "text"), ("a.g", {"x": 1})]
    raw = {"data": {"sources": [{"path": "a"}]}}
    out = apply_overrides(raw, [("data.sources.0.path", "b"), ("lora.rank", 8), ("train", {"output_dir": "o"})])
    assert out == {"data": {"sources": [{"path": "b"}]}, "lora": {"rank": 8}, "train": {"output_dir": "o"}}
    assert raw["data"]["sources"][0]["path"] == "a"  # not modified in place
    assert load_yaml("a: 1e5\nb: 5\nc: .5\nd: '2e-4'") == {"a": 1e5, "b": 5, "c": 0.5, "d": "2e-4"}


def test_int_from_exponent_notation(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["model.max_pixels=2e5", "train.max_steps=1e3"])
    assert r.model.max_pixels == 200000 and r.train["max_steps"] == 1000


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_recipes_load(recipe):
    r = load_recipe(str(REPO / "configs" / recipe))
    ds = r.train.get("deepspeed")
    assert ds is None or Path(ds).is_file()


def test_paper_recipes_match_the_paper():
    s1 = load_recipe(str(REPO / "configs" / "vora_stage1_qwen2.5_7b_aimv2.yaml"))
    assert s1.lora.layers == 24 and s1.lora.rank == 1024 and len(s1.lora.targets) == 7
    t = s1.train
    assert t["learning_rate"] == 2e-4 and t["lr_scheduler_type"] == "constant_with_warmup" and t["warmup_steps"] == 100
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * 8 == 256  # on 8 GPUs
    assert t["bf16"] and t["gradient_checkpointing"] and t.get("weight_decay", 0.0) == 0.0
    assert t["deepspeed"].endswith("zero2.json") and s1.data.max_length == 2048
    assert s1.distill.weight == 1.0 and s1.distill.num_blocks in (None, 24)
    s2 = load_recipe(str(REPO / "configs" / "vora_stage2_qwen2.5_7b_aimv2.yaml"))
    assert s2.stage == 2 and s2.distill is None and s2.trainable.llm == "full" and s2.trainable.patch_embed
    t = s2.train
    assert t["learning_rate"] == 2e-5 and t["lr_scheduler_type"] == "cosine"
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * 8 == 256


def test_every_key_is_documented():
    doc = (REPO / "README.md").read_text()
    for section, rows in reference().items():
        for key, default, _ in rows:
            assert re.search(rf"`{section}\.{key}`", doc), f"{section}.{key} missing from README.md"
