"""Distillation: teachers load offline, losses equal a hand computation, text-only batches run every module; the
trainer hands the step's label-token and image counts to the objective and never writes to the model."""


import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertModel,
    CLIPVisionModel,
    TrainingArguments,
)

from tests.tiny import IMAGE_TOKEN_ID, MEAN, STD, TEACHER_MEAN, TEACHER_STD, P, make_batch, save_teacher
from vora import VoRAForCausalLM
from vora.build import enable_activation_checkpointing
from vora.distill import VoRAForTraining, default_layer_map
from vora.lora import add_lora
from vora.teacher import Teacher, init_patch_embed_from_teacher
from vora.trainer import VoRATrainer


@pytest.fixture(scope="module")
def dirs(llm_dirs, teacher_dir):
    return {"llm": llm_dirs["llama"], "clip": teacher_dir}


def build(dirs, pairs=((1, 1), (2, 3)), weight=0.7):
    torch.manual_seed(0)
    vora = VoRAForCausalLM.from_llm(dirs["llm"], image_token_id=IMAGE_TOKEN_ID, patch_size=P, vision_embed_dim=16,
                                    position_grid=4, dtype=torch.float32)
    add_lora(vora, num_layers=2, rank=4)
    teacher = Teacher.from_pretrained(dirs["clip"], blocks=sorted({t for _, t in pairs}))
    return VoRAForTraining(vora, teacher, list(pairs), weight=weight, image_mean=MEAN, image_std=STD)


def labels_for(input_ids, attention_mask):
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return labels.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)


def test_loss_equals_hand_computation_two_images_of_different_sizes(dirs):
    model = build(dirs).eval()
    input_ids, attention_mask, pixel_values, grid = make_batch([[3, (2, 3), 2], [1, (3, 1), 4]], "right")
    labels = labels_for(input_ids, attention_mask)
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixel_values,
                    image_grid_hw=grid)

        # --- independent reference ---
        vora = model.vora
        ref = vora(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixel_values,
                   image_grid_hw=grid, output_hidden_states=True)
        hidden = ref.hidden_states
        clip = CLIPVisionModel.from_pretrained(dirs["clip"]).eval()
        images = []
        offset = 0
        for gh, gw in grid.tolist():
            patches = pixel_values[offset : offset + gh * gw].t().unsqueeze(0)  # 1, 3*p*p, n
            img = F.fold(patches, output_size=(gh * P, gw * P), kernel_size=P, stride=P)
            img = img * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
            img = F.interpolate(img.clamp(0, 1), size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
            img = img.clamp(0, 1)
            t_mean, t_std = torch.tensor(TEACHER_MEAN).view(1, 3, 1, 1), torch.tensor(TEACHER_STD).view(1, 3, 1, 1)
            images.append((img - t_mean) / t_std)
            offset += gh * gw
        t_hidden = clip(pixel_values=torch.cat(images), output_hidden_states=True).hidden_states
        positions = [(b, t) for b in range(input_ids.shape[0]) for t in range(input_ids.shape[1])
                     if input_ids[b, t] == IMAGE_TOKEN_ID]
        block_losses = []
        for head, (s, t) in zip(model.distill_heads, model.pairs):
            per_image, start = [], 0
            for i, (gh, gw) in enumerate(grid.tolist()):
                feats = t_hidden[t][i, 1:].t().reshape(1, -1, 4, 4)  # CLS dropped, 4x4 teacher grid
                feats = F.interpolate(feats, size=(gh, gw), mode="bilinear", align_corners=False)[0].flatten(1).t()
                pos = positions[start : start + gh * gw]
                h = torch.stack([hidden[s][b, tok] for b, tok in pos])
                cos = F.cosine_similarity(head(h), feats, dim=-1)
                per_image.append((1 - cos).mean())
                start += gh * gw
            block_losses.append(torch.stack(per_image).mean())
        block_losses = torch.stack(block_losses)
    torch.testing.assert_close(got.block_losses, block_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.lm_loss, ref.loss)
    torch.testing.assert_close(got.loss, ref.loss + 0.7 * block_losses.mean(), atol=1e-5, rtol=1e-5)
    assert set(got.logs(model.pairs)) == {"lm_loss", "distill_loss", "distill_block_1", "distill_block_2"}


def test_text_only_batch_runs_every_module_with_zero_weight(dirs):
    model = build(dirs).train()
    input_ids, attention_mask, _, _ = make_batch([[6], [4]], "right")
    labels = labels_for(input_ids, attention_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                pixel_values=torch.zeros(0, 3 * P * P), image_grid_hw=torch.zeros(0, 2, dtype=torch.long))
    with torch.no_grad():
        plain = model.vora(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    torch.testing.assert_close(out.loss, plain)  # LM loss of text-only samples unchanged
    assert float(out.distill_loss) == 0.0
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("distill_heads.") for n in trainable)
    assert any(n.startswith("vora.vision_embed.") for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"modules skipped on a text-only batch: {no_grad}"
    assert all(float(p.grad.abs().sum()) == 0 for n, p in trainable.items()
               if n.startswith(("distill_heads.", "vora.vision_embed.")))


def test_gradient_checkpointing_gives_the_same_gradients(dirs):
    batch = make_batch([[2, (2, 2), 3]], "right")
    kw = dict(input_ids=batch[0], attention_mask=batch[1], labels=labels_for(batch[0], batch[1]),
              pixel_values=batch[2], image_grid_hw=batch[3])
    grads = []
    for ckpt in (False, True):
        model = build(dirs).train()
        if ckpt:
            enable_activation_checkpointing(model.vora, {"use_reentrant": False})
        model(**kw).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind, prefix", [("siglip", 0), ("dinov2", 1)])
def test_other_transformers_teachers(tmp_path, kind, prefix):
    teacher = Teacher.from_pretrained(save_teacher(tmp_path / kind, kind), blocks=[2])
    feats = teacher(torch.rand(2, 3, 8, 8))
    assert list(feats) == [2] and feats[2].shape == (2, 16, 4, 4)
    assert teacher.depth == 3


def test_timm_teacher_from_local_file(tmp_path):
    import timm  # optional: only timm teachers need it

    name = "vit_tiny_patch16_224"
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=32, depth=3)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    # the file holds the weights; a 3-block, 32-px variant of the architecture
    teacher = Teacher.from_pretrained(str(tmp_path / "w.safetensors"), blocks=[1, 3], backend="timm", timm_model=name,
                                      timm_kwargs={"img_size": 32, "depth": 3})
    assert teacher.blocks == [1, 3] and teacher.depth == 3 and teacher.grid == (2, 2)
    # the weights come from the file
    torch.testing.assert_close(teacher.model.patch_embed.proj.weight, model.patch_embed.proj.weight)
    x = torch.rand(2, 3, 32, 32)
    feats = teacher(x)
    model.eval()
    want = model.forward_intermediates((x - teacher.mean) / teacher.std, indices=[2], intermediates_only=True)[0]
    torch.testing.assert_close(feats[3], want)


def test_layer_map_and_errors(dirs, tmp_path):
    assert default_layer_map(3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert default_layer_map(4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    with pytest.raises(ValueError, match="outside 1..3"):
        Teacher.from_pretrained(dirs["clip"], blocks=[4])
    with pytest.raises(ValueError, match="LLM block"):
        build(dirs, pairs=((9, 1),))
    # a teacher without a patch grid
    bert = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    BertModel(bert).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="patch grid"):
        Teacher.from_pretrained(str(tmp_path / "bert"), blocks=[1])


def test_patch_embed_init_from_teacher(dirs, tmp_path):
    vora = VoRAForCausalLM.from_llm(dirs["llm"], image_token_id=IMAGE_TOKEN_ID, patch_size=P, vision_embed_dim=16,
                                    position_grid=4, dtype=torch.float32)
    teacher = Teacher.from_pretrained(dirs["clip"], blocks=[1])
    copied = init_patch_embed_from_teacher(vora.vision_embed, teacher)
    assert "conv.weight" in copied and "position" in copied
    torch.testing.assert_close(vora.vision_embed.conv.weight, teacher.model.embeddings.patch_embedding.weight)
    pos = teacher.model.embeddings.position_embedding.weight[1:]  # CLS dropped, 4x4 grid
    torch.testing.assert_close(vora.vision_embed.position[0].flatten(1).t(), pos)
    wrong = VoRAForCausalLM.from_llm(dirs["llm"], image_token_id=IMAGE_TOKEN_ID, patch_size=4, vision_embed_dim=16,
                                     position_grid=4)
    with pytest.raises(ValueError, match="does not fit"):
        init_patch_embed_from_teacher(wrong.vision_embed, teacher)


def test_batch_without_label_tokens_gives_zero_not_nan(dirs):
    """The collator turns an all-skipped micro-batch into one pad row without labels: loss 0, finite grads."""
    model = build(dirs).train()
    input_ids = torch.zeros(1, 1, dtype=torch.long)
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=torch.full_like(input_ids, -100))
    out.loss.backward()
    assert float(out.loss) == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def step_batches():
    """One optimizer step: micro-batches with 2 images, none (text-only) and 1 image."""
    out = []
    for seed, rows in enumerate([[[3, (2, 3), 2], [1, (3, 1), 4]], [[6], [4]], [[2, (2, 2), 5]]]):
        input_ids, attention_mask, pixel_values, grid = make_batch(rows, "right", seed=seed)
        b = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels_for(input_ids, attention_mask))
        if grid.shape[0]:
            b.update(pixel_values=pixel_values, image_grid_hw=grid)
        out.append(b)
    return out


def step_reference(model, batches, weight):
    """The step's objective by hand: Σ token CE over the step's label tokens (from the full logits) / their count
    + λ · Σ over the step's images of their mean block loss / the image count."""
    lm_sum, n_tokens, distill_sum, n_images = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for b in batches:
            images = {k: b[k] for k in ("pixel_values", "image_grid_hw") if k in b}
            logits = model.vora(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **images).logits
            lm_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum")
            n_tokens += int((b["labels"][:, 1:] != -100).sum())
            n = len(b.get("image_grid_hw", []))
            # per block: the mean over this micro-batch's images (checked by hand above)
            distill_sum += n * model(**b).block_losses.mean() if n else 0.0
            n_images += n
    return lm_sum / n_tokens + weight * distill_sum / n_images


def test_step_counts_given_explicitly_give_the_step_objective(dirs):
    """Each micro-batch is normalised by the step's label tokens and images passed to it: the micro-batch losses
    add up to the step's objective (λ · mean over the step's images, not over each micro-batch's)."""
    model = build(dirs).train()
    batches = step_batches()
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    n_images = sum(len(b.get("image_grid_hw", [])) for b in batches)
    assert n_images == 3
    total = sum(model(**b, num_items_in_batch=n_tokens, num_images_in_batch=n_images).loss for b in batches)
    torch.testing.assert_close(total, step_reference(model, batches, 0.7), atol=1e-5, rtol=1e-5)


def test_trainer_passes_the_counts_and_never_writes_to_the_model(dirs, tmp_path, monkeypatch):
    """VoRATrainer.compute_loss hands the step's counts to the model and sets no attribute on it (λ included):
    the step's micro-batch losses equal the explicit-count calls and the step objective; parameters unchanged."""
    model = build(dirs).train()
    batches = step_batches()
    trainer = VoRATrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    samples, num_items = trainer.get_batch_samples(iter(batches), len(batches), torch.device("cpu"))
    with torch.no_grad():
        model(**batches[0])  # transformers sets up its output-capture hooks on the first forward (its own state)
    modules = {id(m) for m in model.modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    writes = []
    module_setattr = torch.nn.Module.__setattr__

    def recording(self, name, value):
        if id(self) in modules:
            writes.append(f"{type(self).__name__}.{name}")
        module_setattr(self, name, value)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", recording)
    losses = [trainer.compute_loss(model, b, num_items_in_batch=num_items) for b in samples]
    monkeypatch.undo()
    assert writes == [], f"compute_loss wrote to the model: {writes}"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.weight == 0.7
    n_tokens, n_images = int(num_items), 3
    explicit = [model(**b, num_items_in_batch=torch.tensor(float(n_tokens)), num_images_in_batch=float(n_images)).loss
                for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(losses, explicit))
    torch.testing.assert_close(sum(losses), step_reference(model, batches, 0.7), atol=1e-5, rtol=1e-5)
