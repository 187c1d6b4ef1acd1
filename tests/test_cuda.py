"""CUDA paths: the same checks as on CPU, on the GPU kernels (sdpa flash/mem-efficient, flex). Skips without CUDA."""

import pytest
import torch

from tests.test_distill import save_teacher
from tests.test_model import P, ROWS, dense_reference_mask, make_batch
from tests.tiny import IMAGE_TOKEN_ID, save_tiny_llm
from vora import VoRAForCausalLM
from vora.distill import Teacher, VoRAForTraining
from vora.lora import add_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return save_tiny_llm(str(tmp_path_factory.mktemp("cuda") / "qwen2"), arch="qwen2")


def build(path, attn, dtype):
    torch.manual_seed(1)
    return VoRAForCausalLM.from_llm(path, image_token_id=IMAGE_TOKEN_ID, attn_implementation=attn, patch_size=P,
                                    vision_embed_dim=16, position_grid=4, dtype=dtype).cuda().eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mask_matches_dense_reference_on_cuda(llm_dir, attn, dtype, padding_side):
    model = build(llm_dir, attn, dtype)
    assert model.language_model.config._attn_implementation == attn
    input_ids, attention_mask, pixel_values, grid = (t.cuda() for t in make_batch(ROWS, padding_side))
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_hw=grid).logits.float()
        allowed = dense_reference_mask(input_ids.cpu(), attention_mask.cpu(), grid.cpu()).cuda()
        embeds, _ = model.embed_inputs(input_ids, pixel_values, grid)
        float_mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device="cuda").masked_fill(~allowed, torch.finfo(embeds.dtype).min)
        model.language_model.set_attn_implementation("eager")
        want = model.language_model(inputs_embeds=embeds, attention_mask=float_mask).logits.float()
        causal = dense_reference_mask(input_ids.cpu(), attention_mask.cpu(), grid.cpu(), bidirectional=False).cuda()
        causal_mask = torch.zeros(causal.shape, dtype=embeds.dtype, device="cuda").masked_fill(~causal, torch.finfo(embeds.dtype).min)
        wrong = model.language_model(inputs_embeds=embeds, attention_mask=causal_mask).logits.float()
    valid = attention_mask.bool()
    if dtype == torch.float32:
        torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    else:
        # bf16 kernels round differently; the error must be far below what a wrong (causal) mask does.
        err = (got[valid] - want[valid]).abs().mean()
        mask_effect = (wrong[valid] - want[valid]).abs().mean()
        assert err < 0.1 * mask_effect, (float(err), float(mask_effect))


def test_bf16_training_step_with_checkpointing_and_distillation(llm_dir, tmp_path):
    teacher_dir = save_teacher(tmp_path / "clip")
    vora = VoRAForCausalLM.from_llm(llm_dir, image_token_id=IMAGE_TOKEN_ID, patch_size=P, vision_embed_dim=16, position_grid=4,
                                    dtype=torch.bfloat16, attn_implementation="sdpa")
    add_lora(vora, num_layers=2, rank=8)
    vora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = Teacher.from_pretrained(teacher_dir, blocks=[1, 2], dtype=torch.bfloat16)
    model = VoRAForTraining(vora, teacher, [(1, 1), (2, 2)], image_mean=(0.5,) * 3, image_std=(0.5,) * 3).cuda().train()
    batch = [t.cuda() for t in make_batch(ROWS, "right")]
    labels = batch[0].masked_fill((batch[1] == 0) | (batch[0] == IMAGE_TOKEN_ID), -100)
    out = model(input_ids=batch[0], attention_mask=batch[1], labels=labels, pixel_values=batch[2], image_grid_hw=batch[3])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_generate_on_cuda_matches_no_cache_loop(llm_dir, attn):
    model = build(llm_dir, attn, torch.float32)
    input_ids, attention_mask, pixel_values, grid = (t.cuda() for t in make_batch(ROWS, "left"))
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_hw=grid,
                             max_new_tokens=6, do_sample=False, pad_token_id=0)
        ids, mask = input_ids, attention_mask
        for _ in range(6):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_hw=grid).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert out.tolist() == ids.tolist()
