"""CUDA paths: the same checks as on CPU, on the GPU kernels (sdpa flash/mem-efficient, flex). Skips without CUDA."""

import pytest
import torch

from tests.tiny import IMAGE_TOKEN_ID, ROWS, P, dense_reference_mask, make_batch, save_teacher
from vora import VoRAForCausalLM
from vora.build import enable_activation_checkpointing
from vora.distill import VoRAForTraining
from vora.lora import add_lora
from vora.teacher import Teacher

pytestmark = pytest.mark.gpu




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
        got = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                    image_grid_hw=grid).logits.float()
        allowed = dense_reference_mask(input_ids.cpu(), attention_mask.cpu(), grid.cpu()).cuda()
        embeds, _ = model.embed_inputs(input_ids, pixel_values, grid)
        lowest = torch.finfo(embeds.dtype).min
        float_mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device="cuda").masked_fill(~allowed, lowest)
        model.language_model.set_attn_implementation("eager")
        want = model.language_model(inputs_embeds=embeds, attention_mask=float_mask).logits.float()
        causal = dense_reference_mask(input_ids.cpu(), attention_mask.cpu(), grid.cpu(), bidirectional=False).cuda()
        causal_mask = torch.zeros(causal.shape, dtype=embeds.dtype, device="cuda").masked_fill(~causal, lowest)
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
    vora = VoRAForCausalLM.from_llm(llm_dir, image_token_id=IMAGE_TOKEN_ID, patch_size=P, vision_embed_dim=16,
                                    position_grid=4,
                                    dtype=torch.bfloat16, attn_implementation="sdpa")
    add_lora(vora, num_layers=2, rank=8)
    enable_activation_checkpointing(vora, {"use_reentrant": False})
    teacher = Teacher.from_pretrained(teacher_dir, blocks=[1, 2], dtype=torch.bfloat16)
    model = VoRAForTraining(vora, teacher, [(1, 1), (2, 2)], image_mean=(0.5,) * 3, image_std=(0.5,) * 3).cuda().train()
    batch = [t.cuda() for t in make_batch(ROWS, "right")]
    labels = batch[0].masked_fill((batch[1] == 0) | (batch[0] == IMAGE_TOKEN_ID), -100)
    out = model(input_ids=batch[0], attention_mask=batch[1], labels=labels, pixel_values=batch[2],
                image_grid_hw=batch[3])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_generate_on_cuda_matches_no_cache_loop(llm_dir, attn):
    model = build(llm_dir, attn, torch.float32)
    input_ids, attention_mask, pixel_values, grid = (t.cuda() for t in make_batch(ROWS, "left"))
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             image_grid_hw=grid,
                             max_new_tokens=6, do_sample=False, pad_token_id=0)
        ids, mask = input_ids, attention_mask
        for _ in range(6):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                           image_grid_hw=grid).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert out.tolist() == ids.tolist()


# ---------------------------------------------------------------------------------------------------- flex fast path
def packed_batch(samples, bucket=128, max_length=256, seed=0):
    """samples: (text_before, (gh, gw) or None, text_after) each → VoRACollator(packing, pad_to_multiple_of=bucket)."""
    from vora.collator import VoRACollator

    g = torch.Generator().manual_seed(seed)
    items = []
    for before, grid, after in samples:
        n_img = grid[0] * grid[1] if grid else 0
        ids = torch.cat([torch.randint(3, 96, (before,), generator=g), torch.full((n_img,), IMAGE_TOKEN_ID),
                         torch.randint(3, 96, (after,), generator=g)])
        item = {"input_ids": ids, "labels": ids.masked_fill(ids == IMAGE_TOKEN_ID, -100)}
        if grid:
            item["pixel_values"] = torch.randn(n_img, 3 * P * P, generator=g)
            item["image_grid_hw"] = torch.tensor([grid])
        items.append(item)
    batch = VoRACollator(0, max_length=max_length, packing=True, pad_to_multiple_of=bucket, patch_size=P)(items)
    return {k: v.cuda() for k, v in batch.items()}


def lm_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)


def train_step(model, batch, dense: bool):
    """Loss and gradients of one step: through the model's own (flex) mask, or eager with the dense reference."""
    model.zero_grad(set_to_none=True)
    if dense:
        embeds, _ = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_hw"])
        allowed = dense_reference_mask(*(batch[k].cpu() for k in ("input_ids", "attention_mask", "image_grid_hw")))
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(~allowed, torch.finfo(embeds.dtype).min)
        mask = mask.to(embeds.device)
        previous = model.language_model.config._attn_implementation
        model.language_model.set_attn_implementation("eager")
        try:
            logits = model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                          position_ids=batch["position_ids"]).logits
        finally:
            model.language_model.set_attn_implementation(previous)
    else:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    loss = lm_loss(logits, batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


SAMPLES = [(5, (4, 6), 30), (40, None, 20), (3, (2, 2), 9), (2, (5, 5), 60), (50, None, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_block_mask_training_step_matches_dense_reference(llm_dir, dtype):
    """Packed rows with images, padded to a 128 bucket: the flex step (our BlockMask) equals eager + dense mask."""
    model = build(llm_dir, "flex_attention", dtype).train()
    add_lora(model, num_layers=2, rank=8)
    with torch.no_grad():  # B ≠ 0 so every LoRA weight gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    batch = packed_batch(SAMPLES)
    assert batch["input_ids"].shape[1] % 128 == 0 and int(batch["attention_mask"].max()) > 1  # bucketed and packed
    loss, grads = train_step(model, batch, dense=False)
    ref_loss, ref_grads = train_step(model, batch, dense=True)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-4, rtol=1e-3, msg=n)
    else:
        assert abs(float(loss) - float(ref_loss)) < 2e-2 * float(ref_loss)
        for n in grads:
            cos = torch.nn.functional.cosine_similarity(grads[n].flatten(), ref_grads[n].flatten(), dim=0)
            assert cos > 0.99, (n, float(cos))


def test_flex_recompiles_stay_constant_within_a_bucket(llm_dir):
    """Batches of different raw lengths (170, 250, 129 tokens) pad to the same 256-token bucket: after the first
    step compiles flex_attention (forward and backward), later steps compile nothing."""
    from torch._dynamo.utils import counters

    model = build(llm_dir, "flex_attention", torch.bfloat16).train()
    add_lora(model, num_layers=2, rank=8)
    batches = [
        packed_batch([(10, (3, 5), 75), (40, None, 0), (30, None, 0), (100, None, 20)], seed=1),  # rows 170, 120
        packed_batch([(20, (6, 6), 144), (60, None, 0), (50, None, 0)], seed=2),  # rows 250, 60
        packed_batch([(29, (10, 10), 0), (129, None, 0)], seed=3),  # rows 129, 129
    ]
    assert {b["input_ids"].shape for b in batches} == {(2, 256)}
    train_step(model, batches[0], dense=False)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    for batch in batches[1:]:
        train_step(model, batch, dense=False)
    assert counters["stats"]["unique_graphs"] == compiled
