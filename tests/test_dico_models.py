"""Tests of dico_models.py: official keys/shapes/parameter counts of every variant, strict loading of
files in the official layout, the forward pass against an independent float64 functional
re-computation from the spec (the official code as DICO.md in the project spec describes it), classifier-free guidance, class dropout,
feature taps, gradient checkpointing and the official initialisation."""
import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from dico_models import DiCo, DiCo_models, DiCo_S, DiCo_Tiny

KEYS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "spec_keys")

# The official model's parameter counts (the "DiT Parameters" lines of the official training logs)
OFFICIAL_PARAMS = {
    "DiCo-S": 33_137_672,
    "DiCo-B": 129_992_712,
    "DiCo-L": 463_897_992,
    "DiCo-XL": 701_151_368,
    "DiCo-H": 1_037_408_328,
}
OFFICIAL_NUM_KEYS = {"DiCo-S": 323, "DiCo-B": 323, "DiCo-L": 631, "DiCo-XL": 673, "DiCo-H": 897}
STAGES = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")


def official_keys(name):
    with open(os.path.join(KEYS_DIR, f"{name}.json")) as f:
        return [(k, tuple(v)) for k, v in json.load(f).items()]


def random_state_dict(shapes, seed=0, dtype=torch.float32):
    """Random tensors for (key, shape) pairs: weights scaled by 1/sqrt(fan_in), biases and tables O(0.2-1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes:
        v = torch.randn(shape, generator=g, dtype=dtype)
        if "embedding_table" in k:
            pass
        elif len(shape) >= 2:
            v = v / math.sqrt(math.prod(shape[1:]))
        else:
            v = 0.2 * v
        sd[k] = v
    return sd


def randomize_(model, seed=0):
    """Random values for every parameter (the zero-initialised adaLN and head too), so every path matters."""
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(random_state_dict(shapes, seed), strict=True)
    return model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


#################################################################################
#        Independent functional re-computation (from DICO.md, in float64)       #
#################################################################################

def reference_forward(sd, x, t, y, depth, skip_first=False):
    """DiCo's forward written directly from the spec's definitions over a state_dict.

    skip_first=True concatenates [skip, upsampled] (the wrong order); only to show the check bites.
    """
    def conv(h, name, padding=0, groups=1):
        return F.conv2d(h, sd[name + ".weight"], sd.get(name + ".bias"), padding=padding, groups=groups)

    def gelu(h):                                   # the exact (erf) GELU
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))

    def layer_norm2d(h):                           # over channels, no affine, eps 1e-6
        mu = h.mean(dim=1, keepdim=True)
        var = ((h - mu) ** 2).mean(dim=1, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-6)

    def silu(v):
        return v / (1 + torch.exp(-v))

    def block(h, p, c):
        mod = silu(c) @ sd[p + "adaLN_modulation.1.weight"].T + sd[p + "adaLN_modulation.1.bias"]
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, :, None, None] for m in mod.chunk(6, dim=1))
        a = layer_norm2d(h) * (1 + scale1) + shift1
        a = gelu(conv(conv(a, p + "conv1"), p + "conv2", padding=1, groups=a.shape[1]))
        pooled = a.mean(dim=(2, 3), keepdim=True)
        a = a / (1 + torch.exp(-conv(pooled, p + "ca.1")))           # a * sigmoid(ca.1(pool(a)))
        h = h + gate1 * conv(a, p + "conv3")
        m = layer_norm2d(h) * (1 + scale2) + shift2
        return h + gate2 * conv(gelu(conv(m, p + "conv4")), p + "conv5")

    half = 128                                     # 256 features [cos, sin], max period 10000, in float32
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    tfeat = torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(x.dtype)
    conds = []
    for level in range(3):
        p = f"t_embedder_{level + 1}.mlp."
        te = silu(tfeat @ sd[p + "0.weight"].T + sd[p + "0.bias"]) @ sd[p + "2.weight"].T + sd[p + "2.bias"]
        conds.append(te + sd[f"y_embedder.embedding_table_{level}.weight"][y])
    c1, c2, c3 = conds

    def run(h, stage, n, c):
        for i in range(n):
            h = block(h, f"{stage}.{i}.", c)
        return h

    def cat(up, skip):
        return torch.cat([skip, up] if skip_first else [up, skip], dim=1)

    h = conv(x, "x_embedder.proj", padding=1)
    e1 = run(h, "encoder_level_1", depth[0], c1)
    e2 = run(F.pixel_unshuffle(conv(e1, "down1_2.body.0", padding=1), 2), "encoder_level_2", depth[1], c2)
    h = run(F.pixel_unshuffle(conv(e2, "down2_3.body.0", padding=1), 2), "latent", depth[2], c3)
    h = conv(cat(F.pixel_shuffle(conv(h, "up3_2.body.0", padding=1), 2), e2), "reduce_chan_level2")
    h = run(h, "decoder_level_2", depth[3], c2)
    h = conv(cat(F.pixel_shuffle(conv(h, "up2_1.body.0", padding=1), 2), e1), "reduce_chan_level1")
    h = run(h, "decoder_level_1", depth[4], c2)
    mod = silu(c2) @ sd["final_layer.adaLN_modulation.1.weight"].T + sd["final_layer.adaLN_modulation.1.bias"]
    shift, scale = (m[:, :, None, None] for m in mod.chunk(2, dim=1))
    return conv(layer_norm2d(h) * (1 + scale) + shift, "final_layer.out_proj", padding=1)


#################################################################################
#                      Official keys, shapes and parameter counts               #
#################################################################################

def test_registry_names():
    assert list(DiCo_models) == ["DiCo-S", "DiCo-B", "DiCo-L", "DiCo-XL", "DiCo-H", "DiCo-Tiny"]


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_official_keys_and_param_counts_meta(name):
    with torch.device("meta"):
        model = DiCo_models[name]()
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == official_keys(name)            # same names, shapes and order; no buffers
    assert len(got) == OFFICIAL_NUM_KEYS[name]
    assert n_params(model) == OFFICIAL_PARAMS[name]
    assert model.out_channels == 8 and model.in_channels == 4 and model.num_classes == 1000
    assert model.input_size == 32 and model.learn_sigma is True and model.class_dropout_prob == 0.1


def test_constructors_honour_their_arguments():
    with torch.device("meta"):
        m = DiCo_models["DiCo-XL"](input_size=64, num_classes=10, in_channels=3, learn_sigma=False,
                                    class_dropout_prob=0.2)
    sd = m.state_dict()
    assert m.input_size == 64 and m.out_channels == 3 and m.class_dropout_prob == 0.2
    assert sd["x_embedder.proj.weight"].shape == (416, 3, 3, 3)
    assert sd["final_layer.out_proj.weight"].shape == (3, 832, 3, 3)
    assert [sd[f"y_embedder.embedding_table_{i}.weight"].shape for i in range(3)] == [(11, 416), (11, 832), (11, 1664)]
    assert DiCo_Tiny(num_classes=10, class_dropout_prob=0.0).y_embedder.embedding_table_0.num_embeddings == 10


@pytest.fixture(scope="module")
def dico_s():
    torch.manual_seed(0)
    return DiCo_S().eval()


def test_dico_s_real_build_matches_official(dico_s):
    assert [(k, tuple(v.shape)) for k, v in dico_s.state_dict().items()] == official_keys("DiCo-S")
    assert n_params(dico_s) == OFFICIAL_PARAMS["DiCo-S"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["DiCo-B", "DiCo-L", "DiCo-XL", "DiCo-H"])
def test_large_real_build_matches_official(name):
    model = DiCo_models[name]()
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == official_keys(name)
    assert n_params(model) == OFFICIAL_PARAMS[name]


def test_official_layout_file_and_bare_state_dict_load_strict(dico_s, tmp_path):
    ema = random_state_dict(official_keys("DiCo-S"), seed=1)
    model_sd = dict(ema, **{"x_embedder.proj.bias": -ema["x_embedder.proj.bias"]})  # tells the sets apart
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-4).state_dict()
    args = argparse.Namespace(model="DiCo-S", model_domain="dico", global_batch_size=256)
    torch.save({"model": model_sd, "ema": ema, "opt": opt, "args": args}, tmp_path / "0400000.pt")
    torch.save(ema, tmp_path / "bare.pt")
    full = torch.load(tmp_path / "0400000.pt", map_location="cpu", weights_only=False)
    assert set(full) == {"model", "ema", "opt", "args"}
    for sd in (full["ema"], torch.load(tmp_path / "bare.pt", map_location="cpu", weights_only=True)):
        dico_s.load_state_dict(sd, strict=True)
        assert all(torch.equal(v, ema[k]) for k, v in dico_s.state_dict().items())
    with torch.no_grad():
        out = dico_s(torch.randn(1, 4, 32, 32), torch.tensor([500]), torch.tensor([207]))
    assert out.shape == (1, 8, 32, 32) and torch.isfinite(out).all() and out.abs().max() > 0
    bad = dict(ema, **{"encoder_level_1.0.ca.0.weight": torch.ones(1)})
    with pytest.raises(RuntimeError):
        dico_s.load_state_dict(bad, strict=True)


#################################################################################
#                   Forward pass vs. the functional reference                   #
#################################################################################

REFERENCE_CONFIGS = [
    # (constructor kwargs, input shape (N, C, H, W))
    (dict(model="DiCo-Tiny", num_classes=10), (3, 4, 16, 16)),
    (dict(model=None, hidden_size=16, depth=(2, 1, 3, 1, 2), mlp_ratio=4, in_channels=3, num_classes=7,
          learn_sigma=False), (2, 3, 8, 12)),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("cfg,shape", REFERENCE_CONFIGS)
def test_forward_matches_functional_reference(cfg, shape, dtype, tol):
    cfg = dict(cfg)
    name = cfg.pop("model")
    model = DiCo_models[name](**cfg) if name else DiCo(**cfg)
    model = randomize_(model, seed=3).to(dtype).eval()
    n = shape[0]
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 999, 437][:n])
    y = torch.tensor([1, cfg["num_classes"], 5][:n])       # includes the null label
    with torch.no_grad():
        out = model(x, t, y)
        ref = reference_forward(model.state_dict(), x, t, y, model.depth)
    assert out.shape == (n, model.out_channels, shape[2], shape[3])
    assert ref.abs().max() > 0.1                            # the check is not vacuous
    assert (out - ref).abs().max().item() < tol


def test_dico_s_shaped_forward_matches_reference_in_float64():
    """A DiCo-S-shaped network (the official stage layout, blocks and MLP ratio; 1 block per stage)."""
    model = randomize_(DiCo_S(depth=(1, 1, 1, 1, 1), num_classes=10), seed=7).double().eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([3, 871]), torch.tensor([4, 10])
    with torch.no_grad():
        out = model(x, t, y)
        ref = reference_forward(model.state_dict(), x, t, y, model.depth)
    assert ref.abs().max() > 0.1 and (out - ref).abs().max().item() < 1e-10


def test_reference_check_is_sensitive_to_skip_order():
    model = randomize_(DiCo_Tiny(num_classes=10), 3).double().eval()
    x, t, y = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.tensor([10]), torch.tensor([2])
    with torch.no_grad():
        out = model(x, t, y)
        wrong = reference_forward(model.state_dict(), x, t, y, model.depth, skip_first=True)
    assert (out - wrong).abs().max() > 1e-3


#################################################################################
#                          Classifier-free guidance                             #
#################################################################################

@pytest.fixture(scope="module")
def guided_setup():
    model = randomize_(DiCo_Tiny(num_classes=10), seed=5).eval()
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([3, 400, 999]), torch.tensor([1, 2, 9])
    null = torch.full_like(y, 10)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
    return model, (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])), cond, uncond


@pytest.mark.parametrize("guide_channels,guided", [("official", 3), (None, 3), ("all", 4), (2, 2)])
def test_cfg_channel_rules(guided_setup, guide_channels, guided):
    model, inputs, cond, uncond = guided_setup
    s, n = 4.0, cond.shape[0]
    with torch.no_grad():
        out = model.forward_with_cfg(*inputs, s, guide_channels=guide_channels)
        default = model.forward_with_cfg(*inputs, s)
    expect = uncond[:, :guided] + s * (cond[:, :guided] - uncond[:, :guided])
    assert out.shape == (2 * n, 8, 16, 16)
    for rows, plain in ((out[:n], cond), (out[n:], uncond)):
        torch.testing.assert_close(rows[:, :guided], expect, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(rows[:, guided:], plain[:, guided:], atol=1e-5, rtol=1e-5)  # passed through
    if guided == 3:                                         # the official rule is the default
        assert torch.equal(out, default)
        assert (expect[:, 0] - cond[:, 0]).abs().max() > 1e-2 and \
            ((uncond[:, 3] + s * (cond[:, 3] - uncond[:, 3])) - cond[:, 3]).abs().max() > 1e-2


def test_cfg_bad_arguments(guided_setup):
    model, inputs, _, _ = guided_setup
    for bad in (0, 5, "some"):
        with pytest.raises(ValueError, match="guide_channels"):
            model.forward_with_cfg(*inputs, 1.5, guide_channels=bad)


#################################################################################
#                      Class dropout, taps, checkpointing                       #
#################################################################################

def test_class_dropout_once_per_sample_for_all_tables():
    model = randomize_(DiCo_Tiny(num_classes=10, class_dropout_prob=0.5), 4)
    n = 16
    x, t, y = torch.randn(n, 4, 8, 8), torch.randint(0, 1000, (n,)), torch.randint(0, 10, (n,))
    torch.manual_seed(0)
    with torch.no_grad():
        model.eval()
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
        forced = model(x, t, y, force_drop_ids=(torch.arange(n) % 2))
        model.train()
        out = model(x, t, y)
    is_cond = (out - cond).flatten(1).abs().amax(1) < 1e-5
    is_null = (out - uncond).flatten(1).abs().amax(1) < 1e-5
    assert (is_cond ^ is_null).all() and is_cond.any() and is_null.any()  # all three tables or none
    torch.testing.assert_close(forced[1::2], uncond[1::2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forced[::2], cond[::2], atol=1e-5, rtol=1e-5)


def test_feature_taps_are_stage_outputs():
    model = randomize_(DiCo_Tiny(input_size=16, num_classes=10), 6).eval()
    names = model.feature_names()
    assert names == ("enc0", "enc1", "mid", "dec1", "dec0")
    seen = {}
    hooks = [getattr(model, stage)[-1].register_forward_hook(
        lambda _m, _i, o, name=name: seen.__setitem__(name, o)) for stage, name in zip(STAGES, names)]
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 700.0]), torch.tensor([3, 4])
    with torch.no_grad():
        plain = model(x, t, y)
        for h in hooks:
            h.remove()
        out, feats = model(x, t, y, return_features=names)
    assert torch.equal(out, plain) and set(feats) == set(names)
    for name in names:
        assert torch.equal(feats[name], seen[name])
        assert feats[name].shape == (2, model.feature_channels(name), *model.feature_grid(name))
    assert [model.feature_channels(n) for n in names] == [32, 64, 128, 64, 64]   # dec1 at 2C
    assert [model.feature_grid(n)[0] for n in names] == [16, 8, 4, 8, 16]
    with pytest.raises(ValueError, match="no feature tap"):
        model(x, t, y, return_features="block1")


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize_(DiCo_Tiny(num_classes=10), 8).train()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 50, 900]), torch.tensor([1, 2, 3])
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable).zero_grad(set_to_none=True)
        model(x, t, y, force_drop_ids=torch.tensor([0, 1, 0])).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert model.grad_checkpointing
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert all(g is not None and torch.isfinite(g).all() for g in grads[0])  # no unused parameter (DDP)


def test_channels_last_and_bad_inputs():
    model = randomize_(DiCo_Tiny(num_classes=10), 9).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    with torch.no_grad():
        eager = model(x, t, y)
        fast = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(fast, eager, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"30x30 is not divisible by 4"):
        model(torch.randn(1, 4, 30, 30), t[:1], y[:1])
    with pytest.raises(ValueError, match=r"3 channels.*in_channels=4"):
        model(torch.randn(1, 3, 8, 8), t[:1], y[:1])


#################################################################################
#                               Initialisation                                  #
#################################################################################

def test_official_initialisation_and_zero_output():
    torch.manual_seed(0)
    m = DiCo_Tiny(num_classes=100)
    zero = [m.final_layer.adaLN_modulation[1].weight, m.final_layer.adaLN_modulation[1].bias,
            m.final_layer.out_proj.weight, m.final_layer.out_proj.bias]
    for stage in STAGES:
        for block in getattr(m, stage):
            zero += [block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias]
    assert all(torch.count_nonzero(p) == 0 for p in zero)
    for name, p in m.named_parameters():                      # every bias starts at zero
        if name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name

    def xavier(p, fan_in, fan_out):                           # within the bound and filling it
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert bound * 0.9 < p.abs().max() <= bound
        assert abs(p.std().item() - bound / math.sqrt(3)) < 0.1 * bound

    W = 32
    b = m.encoder_level_1[0]
    xavier(b.conv1.weight, W, W)
    xavier(b.conv2.weight, 9, 9 * W)                          # depthwise: fans 9 and 9W
    xavier(b.ca[1].weight, W, W)
    xavier(b.conv4.weight, W, 2 * W)
    xavier(m.decoder_level_1[0].conv5.weight, 4 * W, 2 * W)
    xavier(m.down1_2.body[0].weight, 9 * W, 9 * W // 2)
    xavier(m.up3_2.body[0].weight, 9 * 4 * W, 9 * 8 * W)
    xavier(m.reduce_chan_level2.weight, 4 * W, 2 * W)
    xavier(m.x_embedder.proj.weight, 4 * 9, W)                # the (C, in*9) view, as a Linear
    for i in range(3):
        assert 0.018 < m.y_embedder.tables()[i].weight.std() < 0.022
    for te in (m.t_embedder_1, m.t_embedder_2, m.t_embedder_3):
        assert 0.018 < te.mlp[0].weight.std() < 0.022 and 0.017 < te.mlp[2].weight.std() < 0.023
        assert abs(te.mlp[0].weight.mean()) < 0.002
    with torch.no_grad():                                     # a fresh model outputs exactly zero
        out = m(torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), torch.tensor([1, 100]))
    assert torch.count_nonzero(out) == 0


def test_dico_tiny_size():
    assert n_params(DiCo_Tiny()) == 1_509_320                 # 4 channels, 1000 classes
    assert n_params(DiCo_Tiny(in_channels=1, num_classes=10)) == 1_283_234
