"""The fused LM-head loss (train/lm_loss.py) against transformers' full-logits cross-entropy."""

import pytest
import torch

from bigray.models.gpt import build_gpt, decoder_config
from bigray.train.lm_loss import IGNORE, fuse_loss, mean_loss


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (3, 40), generator=g)
    y = torch.randint(0, vocab, (3, 40), generator=g)
    y[0, :25] = IGNORE  # prompt tokens that do not count
    y[2, :] = IGNORE  # a window with no target at all: contributes 0, not NaN
    return x, y


def _loss_and_grads(model, x, y, fused, autocast):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=x, labels=y) if fused else mean_loss(model(input_ids=x).logits, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_loss_matches_the_full_logits_loss_and_gradients(family, autocast):
    vocab = 300
    reference = build_gpt(decoder_config(family, "tiny", vocab), seed=0)
    fused = build_gpt(decoder_config(family, "tiny", vocab), seed=0)
    assert fuse_loss(fused)
    x, y = _batch(vocab)
    want, want_grads = _loss_and_grads(reference, x, y, fused=False, autocast=autocast)
    got, got_grads = _loss_and_grads(fused, x, y, fused=True, autocast=autocast)
    assert got.item() == pytest.approx(want.item(), rel=1e-5 if not autocast else 2e-3)
    assert want_grads.keys() == got_grads.keys()
    for name, g in want_grads.items():  # bf16 rounds the logits' gradient in another order: ~0.5% apart
        assert (got_grads[name] - g).norm() <= (1e-5 if not autocast else 2e-2) * g.norm() + 1e-12, name
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # evaluation: the loss alone
        assert fused(input_ids=x, labels=y).item() == pytest.approx(got.item(), rel=1e-6)


def test_fused_loss_leaves_a_frozen_head_without_gradient():
    model = build_gpt(decoder_config("llama", "tiny", 300), seed=0)
    for name, p in model.named_parameters():
        p.requires_grad_("layers.1" in name)
    assert fuse_loss(model)
    x, y = _batch(300)
    _, grads = _loss_and_grads(model, x, y, fused=True, autocast=False)
    assert grads and all("layers.1" in n for n in grads)
    assert model.get_output_embeddings().weight.grad is None


def test_a_head_with_a_bias_keeps_the_full_logits():
    model = build_gpt(decoder_config("gpt2", "tiny", 300), seed=0)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(300))
    forward = model.forward
    assert not fuse_loss(model)
    assert model.forward == forward  # left as it was


def test_cpu_bf16_trains_fp32_weights_under_autocast():
    from bigray.cluster import cpu_has_bf16, training_precision
    from bigray.config import DeepSpeedConfig, GPTTrainConfig
    from bigray.train.engine import cpu_autocast, deepspeed_config

    cpu = torch.device("cpu")
    assert training_precision("auto", cpu, cpu_bf16=True) == ("bf16" if cpu_has_bf16() else "fp32")
    assert training_precision("auto", cpu) == "fp32"  # loops without a CPU bf16 path (ResNet)
    assert cpu_autocast("bf16", cpu) and not cpu_autocast("bf16", torch.device("cuda", 0))
    ds = deepspeed_config(
        DeepSpeedConfig(zero_stage=2, precision="bf16"), GPTTrainConfig(), world_size=2, use_gpu=False
    )
    assert not ds["bf16"]["enabled"] and "data_types" not in ds  # DeepSpeed keeps fp32 weights and gradients


def test_a_fused_model_still_gives_logits_without_labels():
    reference = build_gpt(decoder_config("gpt2", "tiny", 300), seed=0)
    model = build_gpt(decoder_config("gpt2", "tiny", 300), seed=0)
    assert fuse_loss(model)
    x, _ = _batch(300)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, reference(input_ids=x).logits)


def test_the_eager_softmax_gradient_matches_the_compiled_one():
    from bigray.train.lm_loss import _softmax_grad, _softmax_grad_eager

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 300, generator=g) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 300, (16,), generator=g)
    valid = (torch.arange(16) % 3 != 0).float()
    (a_loss, a_grad), (b_loss, b_grad) = (
        _softmax_grad(logits, targets, valid),
        _softmax_grad_eager(logits, targets, valid),
    )
    assert torch.allclose(a_loss, b_loss, atol=1e-5) and a_loss[0] == 0
    assert torch.allclose(a_grad.float(), b_grad.float(), atol=1e-2) and not b_grad[0].any()
