"""Gradient checkpointing in DiC and DiT: same outputs and gradients as the plain run (dropout
included, since the RNG state is replayed), blocks really recomputed, state_dict keys unchanged."""
import pytest
import torch

from dic_models import DiC_Tiny
from dit_models import DiT


def perturb_(model, seed=0):
    """Give every parameter (the zero-initialised heads too) random values so every gradient is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def small_dic():
    return perturb_(DiC_Tiny(input_size=16, num_classes=10, dropout=0.2))


def small_dit():
    return perturb_(DiT(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10))


def blocks_of(model):
    """Every block the forward runs through `run_block` (counted with pre-hooks: the recompute stops early,
    once the saved tensors are rebuilt, so a block's forward hook would not fire again)."""
    if hasattr(model, "enc_blocks"):
        return [b for stages in (model.enc_blocks, model.lat_blocks, model.dec_blocks) for s in stages for b in s]
    return list(model.blocks)


def train_step(model, x, t, y, seed):
    """One forward/backward in train mode from a fixed RNG state; returns output, grads and block calls."""
    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in blocks_of(model)]
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, t, y)
    (out.square().mean() + out[:, 0].mean()).backward()
    for h in hooks:
        h.remove()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("build, shape", [(small_dic, (3, 4, 16, 16)), (small_dit, (3, 4, 8, 8))])
def test_checkpointed_gradients_equal_plain(build, shape):
    model = build()
    keys_before = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(shape, generator=g), torch.rand(shape[0], generator=g) * 999
    y = torch.tensor([1, 2, 3])

    out_plain, grads_plain, calls_plain = train_step(model, x, t, y, seed=7)
    assert model.set_grad_checkpointing(True) is model and model.grad_checkpointing
    out_ckpt, grads_ckpt, calls_ckpt = train_step(model, x, t, y, seed=7)

    n_blocks = len(blocks_of(model))
    assert calls_plain == n_blocks and calls_ckpt == 2 * n_blocks   # each block recomputed once in backward
    torch.testing.assert_close(out_ckpt, out_plain, rtol=1e-6, atol=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys()
    # every parameter that trains (pos_embed is frozen) gets a gradient, equal up to float rounding
    assert len(grads_plain) == sum(p.requires_grad for p in model.parameters())
    for k, gp in grads_plain.items():
        assert (grads_ckpt[k] - gp).norm() <= 1e-5 * gp.norm() + 1e-12, k
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == keys_before


def test_dropout_really_draws_so_the_rng_replay_matters():
    """Two plain DiC runs from different seeds differ: without RNG replay the checks above would fail."""
    model = small_dic()
    x, t, y = torch.randn(3, 4, 16, 16), torch.full((3,), 500.0), torch.tensor([1, 2, 3])
    out_a, _, _ = train_step(model, x, t, y, seed=7)
    out_b, _, _ = train_step(model, x, t, y, seed=8)
    assert not torch.allclose(out_a, out_b)


def test_checkpointing_is_off_in_eval_and_under_no_grad():
    model = small_dit().set_grad_checkpointing(True).eval()
    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in model.blocks]
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 9.0]), torch.tensor([0, 1])
    out = model(x, t, y)
    out.sum().backward()
    with torch.no_grad():
        model.train()(x, t, y)
    assert len(calls) == 2 * len(model.blocks)   # one plain call per block per forward, no recompute
    for h in hooks:
        h.remove()
