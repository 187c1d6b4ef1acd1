"""README's Python snippet runs as written, with tiny local checkpoints in place of the hub names."""

import re
from pathlib import Path

import torch

from tests.tiny import IMAGE_TOKEN_ID, make_batch, save_teacher, save_tiny_llm

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet() -> str:
    text = README.read_text()
    section = text.split("## Build a VoRA model in Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_build_snippet_runs(tmp_path):
    llm = save_tiny_llm(str(tmp_path / "llm"), arch="qwen2", layers=4)
    teacher = save_teacher(tmp_path / "vit", "clip", image_size=8, patch=2, width=16, layers=3)
    code = snippet()
    replacements = {
        '"Qwen/Qwen2.5-7B-Instruct"': repr(llm),
        '"apple/aimv2-huge-patch14-448"': repr(teacher),
        "default_layer_map(24,": "default_layer_map(3,",
        "num_layers=24, rank=1024": "num_layers=3, rank=8",
        "image_token_id=151665": f"image_token_id={IMAGE_TOKEN_ID}",
        "dtype=torch.bfloat16": "dtype=torch.float32",
        "patch_size=14": "patch_size=2",
        "position_grid=32": "position_grid=4",
    }
    for old, new in replacements.items():
        assert old in code, f"README snippet changed: {old!r} not found"
        code = code.replace(old, new)
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    trainable = scope["trainable"]
    input_ids, attention_mask, pixel_values, grid = make_batch([[2, (2, 3), 3]], "right")
    out = trainable(input_ids=input_ids, attention_mask=attention_mask,
                    labels=input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, -100),
                    pixel_values=pixel_values, image_grid_hw=grid)
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.logs(scope["pairs"])) >= {"lm_loss", "distill_loss", "distill_block_3"}
