"""The chunked LM loss (`model.chunked_ce`, label positions only) equals transformers' full-logits loss: value and
gradients of every trainable group, for padded / packed, image / text-only batches, with and without gradient
checkpointing, across micro-batches normalised by the step's label count, with tied embeddings and soft-capping."""

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import IMAGE_TOKEN_ID
from tests.tiny import TRAINING_P as P
from tests.tiny import TRAINING_SAMPLES as SAMPLES
from tests.tiny import build_for_training as build
from vora import VoRAForCausalLM
from vora.build import enable_activation_checkpointing
from vora.chunked_ce import chunked_lm_loss
from vora.collator import VoRACollator
from vora.distill import VoRAForTraining


@pytest.fixture(scope="module")
def dirs(llm_dirs, teacher_dir):
    return {"llm": llm_dirs["qwen2"], "tied": llm_dirs["llama_tied"], "clip": teacher_dir}


def batch_for(kind, packing):
    samples = SAMPLES[kind]
    collate = VoRACollator(0, max_length=64 if packing else None, packing=packing, patch_size=P,
                           image_token_id=IMAGE_TOKEN_ID)
    batch = collate(samples)
    if packing:
        assert batch["input_ids"].shape[0] == 1  # really packed: one row, several segments
    return batch


def loss_and_grads(model, batches, chunked, num_items=None):
    model.chunked_ce = chunked
    model.zero_grad(set_to_none=True)
    losses = []
    for batch in batches:
        kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
        out = model(**batch, **kwargs)
        out.loss.backward()
        losses.append(out.lm_loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack(losses), grads


def assert_same(model, batches, num_items=None):
    ref_loss, ref_grads = loss_and_grads(model, batches, chunked=False, num_items=num_items)
    got_loss, got_grads = loss_and_grads(model, batches, chunked=True, num_items=num_items)
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert got_grads.keys() == ref_grads.keys()
    groups = {"lora_A", "lora_B", "vision_embed", "distill_heads"}
    assert {g for g in groups for n in got_grads if g in n} == (groups if model.teacher else groups - {"distill_heads"})
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    return got_loss


@pytest.mark.parametrize("kind", ["images", "text"])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gc"])
def test_chunked_loss_and_gradients_equal_full_logits(dirs, kind, packing, checkpointing):
    model = build(dirs["llm"], dirs["clip"])
    if checkpointing:
        enable_activation_checkpointing(model.vora, {"use_reentrant": False})
    assert_same(model, [batch_for(kind, packing)])


def test_micro_batches_normalised_by_the_step_label_count(dirs):
    """Two micro-batches with the trainer's num_items_in_batch (label tokens of the whole step): the summed loss
    is the mean token CE over the step, computed here by hand from the model's full logits."""
    model = build(dirs["llm"], dirs["clip"])
    batches = [batch_for("images", False), batch_for("text", False)]
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert n == sum(b["num_label_tokens"] for b in batches)
    got = assert_same(model, batches, num_items=torch.tensor(float(n)))
    with torch.no_grad():
        total = 0.0
        for b in batches:
            logits = model.vora(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                pixel_values=b["pixel_values"], image_grid_hw=b["image_grid_hw"]).logits
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(got.sum(), total / n)


def test_no_label_tokens_gives_zero_and_zero_gradient(dirs):
    model = build(dirs["llm"], dirs["clip"])
    batch = VoRACollator(0, patch_size=P, image_token_id=IMAGE_TOKEN_ID)([None])
    assert batch["num_label_tokens"] == 0
    out = model(**batch)
    assert float(out.lm_loss) == 0.0 and not torch.isnan(out.loss)
    out.loss.backward()


def test_tied_embeddings_trained_in_full(dirs):
    """lm_head shares the embedding matrix and trains (trainable.llm: full): its gradient (lm_head part computed in
    the chunked loss, embedding part by autograd) matches the full-logits path."""
    model = build(dirs["tied"], full_llm=True)
    lm = model.vora.language_model
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    ref_loss, ref = loss_and_grads(model, [batch_for("images", False)], chunked=False)
    got_loss, got = loss_and_grads(model, [batch_for("images", False)], chunked=True)
    torch.testing.assert_close(got_loss, ref_loss)
    name = next(n for n, p in model.named_parameters() if p is lm.get_output_embeddings().weight)
    assert got.keys() == ref.keys() and name in got
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_lm_loss_function_against_full_cross_entropy(softcap, chunk):
    """The loss function alone, with a bias, soft-capping and every input trainable, against F.cross_entropy on
    the full [B, L, V] logits (shifted labels, −100 ignored, summed)."""
    torch.manual_seed(0)
    B, L, H, V = 3, 7, 8, 11
    hidden = torch.randn(B, L, H, requires_grad=True)
    head = torch.nn.Linear(H, V)
    labels = torch.randint(0, V, (B, L))
    labels[0, :3] = -100
    labels[2, 4:] = -100
    labels[1, 0] = -100

    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    ref_grads = torch.autograd.grad(ref, [hidden, head.weight, head.bias])

    n = int((labels[:, 1:] != -100).sum())
    for count in (None, n):
        got = chunked_lm_loss(hidden, labels, head, num_label_tokens=count, softcap=softcap, chunk_size=chunk)
        got_grads = torch.autograd.grad(2 * got, [hidden, head.weight, head.bias])  # grad_output is applied
        torch.testing.assert_close(got, ref)
        for g, r in zip(got_grads, ref_grads):
            torch.testing.assert_close(g, 2 * r)
    with torch.no_grad():  # evaluation: no gradient work, same value
        torch.testing.assert_close(chunked_lm_loss(hidden, labels, head, softcap=softcap), ref.detach())


def test_logit_scaling_llms_are_refused(dirs):
    vora = VoRAForCausalLM.from_llm(dirs["llm"], image_token_id=IMAGE_TOKEN_ID, patch_size=P, vision_embed_dim=16,
                                    position_grid=4, dtype=torch.float32)
    vora.config.text_config.logits_scaling = 8.0
    with pytest.raises(ValueError, match="model.chunked_ce: false"):
        VoRAForTraining(vora)
    VoRAForTraining(vora, chunked_ce=False)
