"""Feature taps of DiC and DiT (REPA's hidden states): the tapped tensors are the ones a forward hook
sees on the same module in the same forward, the output is unchanged, and the reported widths and
grids are the real shapes."""
import pytest
import torch

from dic_models import DiC_Tiny, DiC_XL
from dit_models import DiT


def perturb_(model, seed=0):
    """Random values everywhere, zero-initialised heads included, so the output depends on every stage."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def dic_stage_ends(model):
    """Last block of each named stage: its output is the stage's feature map."""
    L = model.levels
    ends = {f"enc{l}": model.enc_blocks[l][-1] for l in range(L - 1)}
    ends["mid"] = model.lat_blocks[0][-1]
    ends.update({f"dec{L - 2 - k}": stage[-1] for k, stage in enumerate(model.dec_blocks)})
    return ends


def forward_with_hooks(model, modules, *args):
    """Output of a plain forward plus what forward hooks on `modules` saw."""
    seen = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
             for name, m in modules.items()]
    out = model(*args)
    for h in hooks:
        h.remove()
    return out, seen


def test_dic_taps_equal_hooks_and_output_unchanged():
    model = perturb_(DiC_Tiny(input_size=16, num_classes=10))
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 700.0]), torch.tensor([3, 4])
    names = model.feature_names()
    assert names == ("enc0", "enc1", "mid", "dec1", "dec0")
    out_plain, seen = forward_with_hooks(model, dic_stage_ends(model), x, t, y)
    assert isinstance(out_plain, torch.Tensor)
    out, feats = model(x, t, y, return_features=names)
    assert torch.equal(out, out_plain) and set(feats) == set(names)
    for name in names:
        assert torch.equal(feats[name], seen[name]), name
        assert feats[name].shape == (2, model.feature_channels(name), *model.feature_grid(name)), name
    # DiC-Tiny at 16x16: widths (32, 64, 64), grids 16, 8, 4, 8, 16
    assert [model.feature_grid(n)[0] for n in names] == [16, 8, 4, 8, 16]
    assert [model.feature_channels(n) for n in names] == [32, 64, 64, 64, 32]
    out_one, one = model(x, t, y, return_features="enc1")
    assert torch.equal(out_one, out_plain) and list(one) == ["enc1"] and torch.equal(one["enc1"], seen["enc1"])


def test_dic_xl_stage_widths_and_grids_at_32():
    with torch.device("meta"):
        model = DiC_XL()
    assert [(n, model.feature_channels(n), model.feature_grid(n)) for n in model.feature_names()] == [
        ("enc0", 384, (32, 32)), ("enc1", 768, (16, 16)), ("mid", 1536, (8, 8)),
        ("dec1", 768, (16, 16)), ("dec0", 384, (32, 32))]
    assert model.feature_grid("enc1", input_size=64) == (32, 32)


def test_dit_taps_equal_hooks_and_output_unchanged():
    model = perturb_(DiT(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.tensor([3, 4])
    assert model.feature_names() == ("block1", "block2", "block3")
    blocks = {f"block{k}": b for k, b in enumerate(model.blocks, start=1)}
    out_plain, seen = forward_with_hooks(model, blocks, x, t, y)
    out, feats = model(x, t, y, return_features=("block2",))
    assert torch.equal(out, out_plain) and list(feats) == ["block2"]
    assert torch.equal(feats["block2"], seen["block2"])          # after the 2nd block (1-based)
    assert not torch.equal(feats["block2"], seen["block1"])
    assert feats["block2"].shape == (2, 16, model.feature_channels("block2"))
    assert model.feature_grid("block2") == (4, 4)


def test_taps_survive_gradient_checkpointing():
    """With checkpointing on in training, taps are still the stage outputs and carry gradients."""
    model = perturb_(DiC_Tiny(input_size=16, num_classes=10)).train()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 700.0]), torch.tensor([3, 4])
    torch.manual_seed(0)
    out_a, feats_a = model(x, t, y, return_features=("mid",))
    model.set_grad_checkpointing(True)
    torch.manual_seed(0)
    out_b, feats_b = model(x, t, y, return_features=("mid",))
    torch.testing.assert_close(feats_b["mid"], feats_a["mid"], rtol=0, atol=0)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    feats_b["mid"].sum().backward()
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("build, bad", [(lambda: DiC_Tiny(input_size=16), "enc2"),
                                        (lambda: DiT(input_size=8, patch_size=2, hidden_size=64, depth=3,
                                                     num_heads=4), "block4")])
def test_unknown_tap_names_fail_with_the_list(build, bad):
    model = build()
    with pytest.raises(ValueError, match=r"no feature tap \['%s'\]; choose from" % bad):
        model(torch.zeros(1, 4, model.input_size, model.input_size), torch.zeros(1), torch.zeros(1).long(),
              return_features=(bad,))
    with pytest.raises(ValueError, match="choose from"):
        model.feature_channels(bad)


@pytest.mark.parametrize("learn_sigma, channels", [(False, 4), (True, 8)])
def test_learn_sigma_sets_output_channels(learn_sigma, channels):
    """SiT's DiT-shaped checkpoints have the 8-channel head (learn_sigma=True); both forms build and run."""
    for model in (DiC_Tiny(input_size=8, num_classes=10, learn_sigma=learn_sigma),
                  DiT(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=4, num_classes=10,
                      learn_sigma=learn_sigma)):
        out = model(torch.randn(1, 4, 8, 8), torch.zeros(1), torch.zeros(1).long())
        assert model.out_channels == channels and out.shape == (1, channels, 8, 8)

