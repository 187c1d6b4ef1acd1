"""The LM loss at label positions only: Σ token cross-entropy from the decoder's final hidden states, with `lm_head`
logits computed chunk by chunk where a label is predicted, never for the whole vocabulary × sequence at once.

A speed and memory kernel: it equals transformers' full-logits `ForCausalLMLoss` with a sum reduction
(tests/test_chunked_ce.py checks values and gradients against it).
"""

import torch
import torch.nn.functional as F
from torch import nn


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ over rows of CE(softcap(h Wᵀ + b), target), chunk by chunk, with the gradients w.r.t. `h` (and `W`, `b`
    when they train) computed in the same pass: a chunk's [rows, vocab] logits die with the chunk, backward only
    scales the stored gradients (no recomputation, no second lm_head call — see `chunked_lm_loss` for ZeRO-3).

    Dtypes follow the transformers path it replaces: logits in the weights' dtype, then fp32 for the softmax; the
    logit gradient is cast back to the weights' dtype for the two matmuls, as autograd does through `.float()`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap, grad_enabled):
        # needs_input_grad ignores no_grad mode (evaluation): the caller passes it.
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        need_b = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = F.linear(h, weight, bias).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            # dCE/dlogits = softmax − one-hot, built in place in the logits buffer.
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(t), device=g.device), t] -= 1
            if softcap:  # d(c·tanh(z/c))/dz = 1 − tanh²
                g.mul_(capped.mul_(capped).neg_().add_(1))
            g = g.to(weight.dtype)
            if need_h:
                grad_h[start : start + chunk_size] = g @ weight
            if need_w:
                grad_w += (g.t() @ h).float()
            if need_b:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.has = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_out).to(dtype) if need else None for need, dtype in zip(ctx.has, ctx.dtypes)]
        return *grads, None, None, None, None


def chunked_lm_loss(hidden, labels, lm_head: nn.Linear, num_label_tokens: int | None = None,
                    softcap: float | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Σ token CE over label tokens — transformers' `ForCausalLMLoss` with a sum reduction — from the final hidden
    states `[B, L, H]`, with `lm_head` logits computed only where a label is predicted (position t predicts
    labels[t + 1]; rows never wrap) and never for the whole vocabulary × sequence at once.

    `num_label_tokens` (host int, the count of labels[:, 1:] != -100, from the collator) sizes the gather without
    reading it back from the device; without it the positions come from `nonzero` (one host sync).
    """
    predicts = F.pad(labels[:, 1:] != -100, (0, 1), value=False).flatten()
    if num_label_tokens is None:
        positions = predicts.nonzero().squeeze(1)
    else:
        positions = torch.nonzero_static(predicts, size=int(num_label_tokens)).squeeze(1)
    h = hidden.flatten(0, 1).index_select(0, positions)
    targets = labels.flatten().index_select(0, positions + 1)
    weight, bias = lm_head.weight, lm_head.bias
    grad_enabled = torch.is_grad_enabled()
    if not hasattr(weight, "ds_id"):
        return _LinearCrossEntropy.apply(h, weight, bias, targets, chunk_size, softcap, grad_enabled)
    # ZeRO-3 partitions the lm_head: gather it once per forward on every rank (the same collective count everywhere,
    # whatever each rank's label count); the loss needs no weight in backward. A weight that is already gathered
    # (tied to the embedding, still held by it) is used as it is and left to its holder.
    import deepspeed  # only under ZeRO-3, where deepspeed is loaded already
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = [x for x in (weight, bias) if x is not None and x.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    with deepspeed.zero.GatheredParameters(params):
        return _LinearCrossEntropy.apply(h, weight, bias, targets, chunk_size, softcap, grad_enabled)
