"""The language-model loss: cross-entropy of the LM head's logits, computed a chunk of tokens at a time.

With a 50k vocabulary the LM head and its softmax are most of a small model's FLOPs, and the full
logits (tokens x vocab, in fp32) are the largest tensor of a step: 412 MB for 16 x 128 tokens,
written, upcast, soft-maxed and kept for the backward pass. The fused path (Liger-Kernel's
FusedLinearCrossEntropy, done in torch) never holds them: each chunk's logits are computed, turned
into the chunk's loss and its gradients with respect to the hidden states and the head's weight, and
dropped; the backward pass only scales those gradients. Same matmuls, no logits tensor, one exp per
logit, everything on a chunk that stays in cache. Measured in bench/gpt_step_profile.py.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import record_function

log = logging.getLogger(__name__)

IGNORE = -100
"""Targets that do not count (prompt tokens of chat data), as in torch's cross_entropy."""

CHUNK_TOKENS = 128
"""Tokens per chunk: 128 x 50k fp32 logits (25 MB) balance the head matmul's efficiency (it wants
long chunks) against the softmax passes staying in cache (they want short ones); 64 and 256 were
slower on a 2-core EPYC (bench/README.md)."""


def mean_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of full logits over the targets that count (0, not NaN, when none does)."""
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total / (targets != IGNORE).sum().clamp(min=1)


def fuse_loss(model: torch.nn.Module) -> bool:
    """Make ``model`` (a transformers causal LM, or a peft model around one), when called with
    ``labels`` (the targets, already shifted), return their fused loss (a scalar tensor, no logits);
    without labels it returns its usual output. False, and the model left as it is, when its head is
    not a plain bias-free linear map or its weight is partitioned (ZeRO-3).

    The loss is the model's own output, so a DeepSpeed engine around it sees its forward and
    backward exactly as with logits: its backward hooks fire on the loss before any gradient. The
    forward is replaced on this instance only; weights and state dict are untouched.
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the transformers model
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    body = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    scaled = any(
        getattr(hf.config, k, None) for k in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
    )
    if (
        not isinstance(head, torch.nn.Linear)
        or head.bias is not None
        or body is None
        or scaled
        or hasattr(head.weight, "ds_id")
    ):
        return False

    original = hf.forward

    def forward(input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, **inputs: Any) -> Any:
        if labels is None:  # logits, as before (generation, inspection)
            return original(input_ids=input_ids, **inputs)
        with record_function("forward/body"):
            hidden = body(input_ids=input_ids, **{k: v for k, v in inputs.items() if v is not None}).last_hidden_state
        with record_function("forward/lm_head_loss"):
            device = hidden.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
            hidden, targets = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
            if not torch.is_grad_enabled():
                return _chunked_loss(hidden, head.weight, targets, dtype, grads=False)[0]
            return _FusedLinearCrossEntropy.apply(hidden, head.weight, targets, dtype)

    hf.forward = forward
    return True


def _chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype,
    grads: bool,
    weight_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss, and (``grads``) d(summed loss)/d hidden and (``weight_grad``) d(summed loss)/d weight."""
    valid = (targets != IGNORE).to(torch.float32)
    count = valid.sum().clamp(min=1)
    targets = targets.clamp(min=0)
    w = weight.detach().to(dtype)
    h = hidden.detach().to(dtype)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    grad_hidden = torch.empty_like(h) if grads else None
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads and weight_grad else None
    )
    for i in range(0, h.size(0), CHUNK_TOKENS):
        hc, yc, vc = h[i : i + CHUNK_TOKENS], targets[i : i + CHUNK_TOKENS], valid[i : i + CHUNK_TOKENS]
        logits = torch.mm(hc, w.t())
        if not grads:
            lf = logits.float()
            total += ((torch.logsumexp(lf, -1) - lf.gather(1, yc[:, None]).squeeze(1)) * vc).sum()
            continue
        losses, p = softmax_grad(logits, yc, vc)
        total += losses.sum()
        torch.mm(p, w, out=grad_hidden[i : i + CHUNK_TOKENS])
        if grad_weight is not None:  # a frozen head (LoRA) needs none
            grad_weight.add_(torch.mm(p.t(), hc))
    return (total / count).float(), grad_hidden, grad_weight


def _softmax_grad(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (fp32) and d loss/d logits (softmax minus one-hot, zero on rows that do not
    count) in the logits' dtype, for one chunk; the softmax is computed in fp32. Written for
    Inductor, which fuses it into two passes (eager it takes eight: :func:`_softmax_grad_eager`)."""
    lf = logits.float()
    top = lf.amax(-1, keepdim=True)
    exp = (lf - top).exp()
    norm = exp.sum(-1, keepdim=True)
    losses = (norm.log() + top - lf.gather(1, targets[:, None])).squeeze(1) * valid
    one_hot = torch.zeros_like(lf).scatter_(1, targets[:, None], 1.0)
    return losses, ((exp / norm - one_hot) * valid[:, None]).to(logits.dtype)


@functools.cache
def _compiled_softmax_grad() -> Any:
    """Compiled on first use: importing torch's compiler stack costs 3 s, which the driver and
    loops that never train on the fused path should not pay."""
    return torch.compile(_softmax_grad, dynamic=False)


def _softmax_grad_eager(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_softmax_grad` in the fewest eager passes (log_softmax is one fused kernel): 0.31 s
    a step where the compiled one takes 0.12 s and the compiler's form run eager 1.4 s."""
    log_probs = torch.log_softmax(logits.float(), -1)
    rows = torch.arange(log_probs.size(0), device=log_probs.device)
    losses = -log_probs[rows, targets] * valid
    grad = log_probs.exp_()
    grad[rows, targets] -= 1
    return losses, grad.mul_(valid[:, None]).to(logits.dtype)


_eager_only = False


def softmax_grad(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_softmax_grad`, compiled: 0.12 s a step for 2,048 tokens x 50k on one core instead of
    0.31 s eager; compiled once per chunk shape, 25 s cold, 3 s from Inductor's on-disk cache.
    Eager where compiling fails (no C++ compiler)."""
    global _eager_only
    if not _eager_only:
        try:
            return _compiled_softmax_grad()(logits, targets, valid)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            log.warning("the fused loss runs eager: torch.compile failed (%s)", str(e).splitlines()[0])
            _eager_only = True
    return _softmax_grad_eager(logits, targets, valid)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss of ``hidden @ weight.T`` against targets, gradients computed in the forward pass."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        loss, grad_hidden, grad_weight = _chunked_loss(
            hidden, weight, targets, dtype, grads=True, weight_grad=ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(grad_hidden, grad_weight, (targets != IGNORE).sum().clamp(min=1))
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None, None]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad / count
        weight = (grad_weight * scale).to(ctx.dtypes[1]) if grad_weight is not None else None
        return (grad_hidden * scale).to(ctx.dtypes[0]), weight, None, None
