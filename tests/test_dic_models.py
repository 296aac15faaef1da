"""Tests of dic_models.py: official keys/shapes/parameter counts, strict loading of official
state_dicts, the forward pass against an independent functional re-computation from the spec
(/work/shared/spec/DIC.md), classifier-free guidance, class dropout, sizes and initialisation."""
import json
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from dic_models import DiC, DiC_models, DiC_S, DiC_B, DiC_Tiny

# Official key/shape dumps, shipped with the tests so every clone checks them.
KEYS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "spec_keys")

# Parameter counts from the paper's table (input_size 32, 4 latent channels, 1000 classes)
OFFICIAL_PARAMS = {
    "DiC-S": 32_835_752,
    "DiC-B": 129_529_160,
    "DiC-XL": 702_266_120,
    "DiC-H": 1_034_516_744,
}
OFFICIAL_NUM_KEYS = {"DiC-S": 325, "DiC-B": 325, "DiC-XL": 399, "DiC-H": 707}


def official_keys(name):
    path = os.path.join(KEYS_DIR, f"{name}.json")
    with open(path) as f:
        return [(k, tuple(v)) for k, v in json.load(f).items()]


def random_state_dict(shapes, seed=0, dtype=torch.float32):
    """Random tensors for the given (key, shape) list; weights scaled by 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes:
        v = torch.randn(shape, generator=g, dtype=dtype)
        if k.endswith("embedding_table.weight"):
            pass
        elif len(shape) >= 2:
            v = v / math.sqrt(math.prod(shape[1:]))
        elif "norm" in k and k.endswith(".weight"):
            v = 1 + 0.2 * v
        else:
            v = 0.2 * v
        sd[k] = v
    return sd


def randomize_(model, seed=0):
    """Give every parameter (also the zero-initialised ones) random values, so every path matters."""
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(random_state_dict(shapes, seed), strict=True)
    return model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


#################################################################################
#            Independent functional re-computation (from DIC.md facts)          #
#################################################################################

def reference_forward(sd, x, t, y, depth, skip_stride=3, gating=True, fifo=False):
    """DiC forward written directly from the spec over a state_dict (3 resolution levels).

    fifo=True pops each level's skips first-in-first-out (wrong); only to show the check bites.
    """
    def group_norm(h, prefix):
        ch = h.shape[1]
        return F.group_norm(h, min(32, ch // 4), sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-5)

    def conv3(h, name):
        return F.conv2d(h, sd[name + ".weight"], sd.get(name + ".bias"), padding=1)

    def block(h, prefix, c):
        p = prefix + ".conv."
        out = conv3(F.gelu(group_norm(h, p + "norm0")), p + "conv0")
        mod = F.linear(F.silu(c), sd[p + "affine.1.weight"], sd[p + "affine.1.bias"])
        w = out.shape[1]
        if gating:  # chunk order: gate, scale, shift
            gate, scale, shift = mod[:, :w], mod[:, w:2 * w], mod[:, 2 * w:]
            gate = gate[:, :, None, None]
        else:       # scale, shift
            scale, shift, gate = mod[:, :w], mod[:, w:], 1.0
        out = F.gelu(group_norm(out, p + "norm1") * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        out = conv3(out, p + "conv1")
        if p + "skip.weight" in sd:
            res = F.conv2d(h, sd[p + "skip.weight"], sd[p + "skip.bias"])
        else:
            res = h
        return gate * out + res

    # timestep features: 256 = [cos, sin], max_period 10000, computed in float32 as DiT does
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    tfeat = torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(x.dtype)
    conds = []
    for lv in range(3):
        te = F.linear(tfeat, sd[f"t_embedder_ls.{lv}.mlp.0.weight"], sd[f"t_embedder_ls.{lv}.mlp.0.bias"])
        te = F.linear(F.silu(te), sd[f"t_embedder_ls.{lv}.mlp.2.weight"], sd[f"t_embedder_ls.{lv}.mlp.2.bias"])
        conds.append(te + sd[f"y_embedder_ls.{lv}.embedding_table.weight"][y])

    h = conv3(x, "x_embedder.proj")
    stack = []
    for lv in range(2):
        n = depth[lv]
        for i in range(n):
            h = block(h, f"enc_blocks.{lv}.{i}", conds[lv])
            if (n - 1 - i) % skip_stride == 0:
                stack.append(h)
        h = F.pixel_unshuffle(F.conv2d(h, sd[f"downs.{lv}.body.0.weight"], padding=1), 2)
    for i in range(depth[2]):
        h = block(h, f"lat_blocks.0.{i}", conds[2])
    for k, lv in enumerate([1, 0]):
        h = F.pixel_shuffle(F.conv2d(h, sd[f"ups.{k}.body.0.weight"], padding=1), 2)
        for i in range(depth[3 + k]):
            if i % skip_stride == 0:
                j = -1
                if fifo:  # oldest skip of this resolution instead of the newest
                    j = next(j for j, s in enumerate(stack) if s.shape[-2:] == h.shape[-2:])
                h = torch.cat([h, stack.pop(j)], dim=1)
            h = block(h, f"dec_blocks.{k}.{i}", conds[lv])
    assert not stack
    h = conv3(h, "output")
    mod = F.linear(F.silu(conds[0]), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    w = h.shape[1]
    shift, scale = mod[:, :w], mod[:, w:]          # final layer chunk order: shift, scale
    mu = h.mean(dim=1, keepdim=True)
    var = h.var(dim=1, unbiased=False, keepdim=True)
    h = (h - mu) / torch.sqrt(var + 1e-6)          # LayerNorm over channels, no affine
    h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return conv3(h, "final_layer.out_proj")


#################################################################################
#                      Official keys, shapes and parameter counts               #
#################################################################################

def test_registry_names():
    assert list(DiC_models) == ["DiC-S", "DiC-B", "DiC-XL", "DiC-H", "DiC-Tiny"]


@pytest.mark.parametrize("name", ["DiC-S", "DiC-B", "DiC-XL", "DiC-H"])
def test_official_keys_and_param_counts_meta(name):
    with torch.device("meta"):
        model = DiC_models[name]()
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == official_keys(name)  # same names, shapes and order
    assert len(got) == OFFICIAL_NUM_KEYS[name]
    assert n_params(model) == OFFICIAL_PARAMS[name]
    assert model.out_channels == 8 and model.in_channels == 4 and model.num_classes == 1000
    assert model.input_size == 32 and model.learn_sigma is True


@pytest.fixture(scope="module")
def dic_s():
    torch.manual_seed(0)
    return DiC_S().eval()


def test_dic_s_real_build_matches_official(dic_s):
    got = [(k, tuple(v.shape)) for k, v in dic_s.state_dict().items()]
    assert got == official_keys("DiC-S")
    assert n_params(dic_s) == OFFICIAL_PARAMS["DiC-S"]


def test_dic_b_real_build_matches_official():
    torch.manual_seed(0)
    model = DiC_B()
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == official_keys("DiC-B")
    assert n_params(model) == OFFICIAL_PARAMS["DiC-B"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["DiC-XL", "DiC-H"])
def test_large_real_build_matches_official(name):
    model = DiC_models[name]()
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == official_keys(name)
    assert n_params(model) == OFFICIAL_PARAMS[name]


def test_official_state_dict_loads_strict_and_runs(dic_s):
    shapes = official_keys("DiC-S")
    sd = random_state_dict(shapes, seed=1)
    dic_s.load_state_dict(sd, strict=True)
    for k, v in dic_s.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        out = dic_s(x, torch.tensor([500]), torch.tensor([207]))
    assert out.shape == (1, 8, 32, 32)
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0


def test_official_state_dict_wrong_key_fails_strict(dic_s):
    sd = random_state_dict(official_keys("DiC-S"))
    sd["enc_blocks.0.0.conv.gamma"] = torch.ones(96)
    with pytest.raises(RuntimeError):
        dic_s.load_state_dict(sd, strict=True)


#################################################################################
#                   Forward pass vs. the functional reference                   #
#################################################################################

REFERENCE_CONFIGS = [
    # (constructor kwargs, input shape (N, C, H, W)); skip concat and 1x1 skips in all
    (dict(model="DiC-Tiny", in_channels=4, num_classes=10), (3, 4, 16, 16)),
    (dict(model=None, hidden_size=16, depth=(4, 4, 2, 4, 4), mult_channels=(1, 2, 4), in_channels=4,
          num_classes=10), (2, 4, 8, 8)),
    (dict(model=None, hidden_size=16, depth=(3, 2, 1, 2, 3), skip_stride=2, gating=False,
          in_channels=3, num_classes=7, learn_sigma=False), (2, 3, 8, 12)),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("cfg,shape", REFERENCE_CONFIGS)
def test_forward_matches_functional_reference(cfg, shape, dtype, tol):
    cfg = dict(cfg)
    name = cfg.pop("model")
    torch.manual_seed(0)
    model = DiC_models[name](**cfg) if name else DiC(**cfg)
    randomize_(model, seed=3)
    model = model.to(dtype).eval()
    sd = model.state_dict()
    n = shape[0]
    x = torch.randn(shape, dtype=dtype)
    t = torch.tensor([0, 999, 437][:n])
    y = torch.tensor([1, cfg["num_classes"], 5][:n])  # includes the null label
    with torch.no_grad():
        out = model(x, t, y)
        ref = reference_forward(sd, x, t, y, model.depth, model.skip_stride, model.gating)
    assert out.shape == (n, model.out_channels, shape[2], shape[3])
    assert ref.abs().max() > 0.1  # the check is not vacuous
    assert (out - ref).abs().max().item() < tol


def test_reference_check_is_sensitive_to_skip_order():
    """The reference check bites: popping skips in the wrong order changes the output."""
    torch.manual_seed(0)
    model = randomize_(DiC(hidden_size=16, depth=(4, 4, 2, 4, 4), mult_channels=(1, 2, 4), num_classes=10), 3)
    sd = model.eval().state_dict()
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.tensor([2])
    with torch.no_grad():
        out = model(x, t, y)
        wrong = reference_forward(sd, x, t, y, model.depth, fifo=True)
    assert (out - wrong).abs().max() > 1e-3


#################################################################################
#                          Classifier-free guidance                             #
#################################################################################

@pytest.fixture(scope="module")
def guided_setup():
    torch.manual_seed(0)
    model = randomize_(DiC_Tiny(num_classes=10), seed=5).eval()
    n = 3
    x = torch.randn(n, 4, 16, 16)
    t = torch.tensor([3, 400, 999])
    y = torch.tensor([1, 2, 9])
    null = torch.full_like(y, 10)
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, null)
    inputs = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    return model, inputs, cond, uncond


def _cfg(model, inputs, scale, guide_channels=None):
    with torch.no_grad():
        return model.forward_with_cfg(*inputs, scale, guide_channels=guide_channels)


def test_cfg_scale_one_equals_conditional_forward(guided_setup):
    model, inputs, cond, uncond = guided_setup
    out = _cfg(model, inputs, 1.0)
    n = cond.shape[0]
    assert out.shape == (2 * n, 8, 16, 16)
    torch.testing.assert_close(out[:n], cond, atol=1e-5, rtol=1e-5)       # guided + passthrough
    torch.testing.assert_close(out[n:, :3], cond[:, :3], atol=1e-5, rtol=1e-5)  # guided eps copied
    torch.testing.assert_close(out[n:, 3:], uncond[:, 3:], atol=1e-5, rtol=1e-5)  # passthrough


def test_cfg_all_channels_guided(guided_setup):
    model, inputs, cond, uncond = guided_setup
    s = 4.0
    n = cond.shape[0]
    guided = uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4])
    for gc in ("all", 4):
        out = _cfg(model, inputs, s, guide_channels=gc)
        torch.testing.assert_close(out[:n, :4], guided, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out[n:, :4], guided, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out[:n, 4:], cond[:, 4:], atol=1e-5, rtol=1e-5)   # variance channels
        torch.testing.assert_close(out[n:, 4:], uncond[:, 4:], atol=1e-5, rtol=1e-5)


def test_cfg_default_guides_three_channels(guided_setup):
    model, inputs, cond, uncond = guided_setup
    s = 4.0
    n = cond.shape[0]
    out = _cfg(model, inputs, s)                     # official default: min(3, in_channels) = 3
    guided = uncond + s * (cond - uncond)
    torch.testing.assert_close(out[:n, :3], guided[:, :3], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[:n, 3:], cond[:, 3:], atol=1e-5, rtol=1e-5)  # channel 3 NOT guided
    assert (guided[:, 3] - cond[:, 3]).abs().max() > 1e-2                        # and that differs
    out2 = _cfg(model, inputs, s, guide_channels=2)
    torch.testing.assert_close(out2[:n, :2], guided[:, :2], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out2[:n, 2:], cond[:, 2:], atol=1e-5, rtol=1e-5)


def test_cfg_bad_arguments(guided_setup):
    model, inputs, _, _ = guided_setup
    for bad in (0, 5, "some", 2.0, True):
        with pytest.raises(ValueError, match="guide_channels"):
            _cfg(model, inputs, 1.5, guide_channels=bad)
    x, t, y = inputs
    with pytest.raises(ValueError, match="even batch"):
        _cfg(model, (x[:3], t[:3], y[:3]), 1.5)


def test_cfg_default_with_one_channel():
    model = randomize_(DiC_Tiny(in_channels=1, num_classes=10), 2).eval()
    x = torch.randn(1, 1, 8, 8)
    xx, tt, yy = torch.cat([x, x]), torch.tensor([5, 5]), torch.tensor([3, 10])
    with torch.no_grad():
        out = model.forward_with_cfg(xx, tt, yy, 2.0)
        cond, uncond = model(x, tt[:1], yy[:1]), model(x, tt[:1], yy[1:])
    torch.testing.assert_close(out[:1, :1], uncond[:, :1] + 2.0 * (cond[:, :1] - uncond[:, :1]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[:1, 1:], cond[:, 1:], atol=1e-5, rtol=1e-5)


#################################################################################
#                     Sizes, channels and input validation                      #
#################################################################################

@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("in_channels", [1, 3, 4])
def test_sizes_and_channels(size, in_channels):
    model = DiC_Tiny(input_size=size, in_channels=in_channels, num_classes=10).eval()
    randomize_(model, 1)
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 900]), torch.tensor([0, 9]))
    assert out.shape == (2, 2 * in_channels, size, size)
    assert model.out_channels == 2 * in_channels and model.input_size == size
    assert torch.isfinite(out).all()
    model2 = DiC_Tiny(in_channels=in_channels, learn_sigma=False, num_classes=10).eval()
    with torch.no_grad():
        assert model2(x, torch.tensor([1, 2]), torch.tensor([0, 1])).shape == (2, in_channels, size, size)


def test_dic_s_at_64(dic_s):
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        out = dic_s(x, torch.tensor([10]), torch.tensor([3]))
    assert out.shape == (1, 8, 64, 64) and torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    model = DiC_Tiny(num_classes=10).eval()
    t, y = torch.tensor([1]), torch.tensor([1])
    with pytest.raises(ValueError, match=r"30x30 is not divisible by 4.*multiple of 4"):
        model(torch.randn(1, 4, 30, 30), t, y)
    with pytest.raises(ValueError, match=r"32x18 is not divisible by 4"):
        model(torch.randn(1, 4, 32, 18), t, y)
    with pytest.raises(ValueError, match=r"3 channels.*in_channels=4"):
        model(torch.randn(1, 3, 16, 16), t, y)
    with pytest.raises(ValueError, match="one entry per sample"):
        model(torch.randn(2, 4, 16, 16), t, y)
    for msg in (str(e) for e in _errors(model)):
        assert "\n" not in msg


def _errors(model):
    errs = []
    for x in (torch.randn(1, 4, 30, 30), torch.randn(1, 3, 16, 16)):
        try:
            model(x, torch.tensor([1]), torch.tensor([1]))
        except ValueError as e:
            errs.append(e)
    assert len(errs) == 2
    return errs


def test_bad_configs_raise():
    with torch.device("meta"):
        with pytest.raises(ValueError, match="pushes"):
            DiC_S(depth=(6, 6, 5, 3, 6))
        with pytest.raises(ValueError, match="mirrored"):
            DiC_S(mult_channels=(1, 2, 4, 2, 2))
        with pytest.raises(ValueError, match="GroupNorm"):
            DiC_S(hidden_size=50)


#################################################################################
#                        Knobs (ablations one keyword away)                     #
#################################################################################

def test_knob_overrides():
    with torch.device("meta"):
        m = DiC_S(skip_stride=1)
        skips = [k for k in m.state_dict() if k.startswith("dec_blocks") and k.endswith("skip.weight")]
        assert len(skips) == 12 and m.skip_stride == 1       # every decoder block takes a skip
        m = DiC_S(gating=False)
        assert m.state_dict()["enc_blocks.0.0.conv.affine.1.weight"].shape == (192, 96)
        m = DiC_S(depth=[2, 2, 2, 2, 2], hidden_size=64)
        assert m.depth == (2, 2, 2, 2, 2) and m.widths == [64, 128, 256]
        m = DiC_S(mult_channels=(1, 2, 2))                   # short form, mirrored
        assert m.mult_channels == (1, 2, 2, 2, 1)
    m = DiC_Tiny(dropout=0.5, num_classes=10)
    assert m.enc_blocks[0][0].conv.dropout == 0.5


def test_dic_tiny_size_and_groupnorm_groups():
    m = DiC_Tiny()
    assert n_params(m) == 1_123_848                          # 4 channels, 1000 classes
    assert n_params(DiC_Tiny(in_channels=1, num_classes=10)) == 962_850
    groups = {mod.num_channels: mod.num_groups for mod in m.modules() if isinstance(mod, torch.nn.GroupNorm)}
    assert groups == {32: 8, 64: 16, 128: 32}                # 64/128 are the skip-concat inputs
    assert {mod.num_groups for mod in DiC_S().modules() if isinstance(mod, torch.nn.GroupNorm)} == {24, 32}


#################################################################################
#                               Class dropout                                   #
#################################################################################

def test_class_dropout_train_vs_eval():
    torch.manual_seed(0)
    model = randomize_(DiC_Tiny(num_classes=10, class_dropout_prob=1.0), 4)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([7, 70])
    y, null = torch.tensor([3, 4]), torch.tensor([10, 10])
    model.eval()
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        assert (cond - uncond).abs().max() > 1e-3
        model.train()
        dropped = model(x, t, y)                             # p = 1: every label is the null label
        model.eval()
        forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
    torch.testing.assert_close(dropped, uncond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forced[0], uncond[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forced[1], cond[1], atol=1e-5, rtol=1e-5)


def test_class_dropout_same_labels_at_every_level():
    torch.manual_seed(0)
    model = randomize_(DiC_Tiny(num_classes=10, class_dropout_prob=0.5), 4)
    n = 16
    x, t, y = torch.randn(n, 4, 8, 8), torch.randint(0, 1000, (n,)), torch.randint(0, 10, (n,))
    with torch.no_grad():
        model.eval()
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
        model.train()
        out = model(x, t, y)
    is_cond = (out - cond).flatten(1).abs().amax(1) < 1e-5
    is_null = (out - uncond).flatten(1).abs().amax(1) < 1e-5
    assert (is_cond ^ is_null).all()                          # each row fully dropped or not at all
    assert is_cond.any() and is_null.any()


def test_no_null_row_without_dropout():
    model = DiC_Tiny(num_classes=10, class_dropout_prob=0.0)
    assert model.y_embedder_ls[0].embedding_table.num_embeddings == 10
    with pytest.raises(ValueError, match="class_dropout_prob > 0"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([1]), force_drop_ids=torch.tensor([1]))


#################################################################################
#                               Initialisation                                  #
#################################################################################

def test_official_initialisation():
    torch.manual_seed(0)
    m = DiC_Tiny(num_classes=100)
    fl = m.final_layer
    for p in (fl.adaLN_modulation[1].weight, fl.adaLN_modulation[1].bias, fl.out_proj.weight, fl.out_proj.bias):
        assert torch.count_nonzero(p) == 0
    aff = m.enc_blocks[0][0].conv.affine[1].weight               # (96, 32): xavier, not zero
    bound = math.sqrt(6 / (32 + 96))
    assert aff.abs().max() <= bound and aff.abs().max() > 0.9 * bound
    assert torch.count_nonzero(m.enc_blocks[0][0].conv.affine[1].bias) == 0
    conv = m.enc_blocks[0][0].conv.conv0.weight                  # xavier with fan = ch * 9
    assert conv.abs().max() <= math.sqrt(6 / (2 * 32 * 9)) + 1e-7
    xw = m.x_embedder.proj.weight                                # xavier on the (32, 4*9) view
    xb = math.sqrt(6 / (4 * 9 + 32))
    assert xw.abs().max() <= xb and xw.abs().max() > 0.9 * xb
    for emb in m.y_embedder_ls:
        assert 0.017 < emb.embedding_table.weight.std() < 0.023
    for te in m.t_embedder_ls:
        assert 0.017 < te.mlp[0].weight.std() < 0.023 and 0.015 < te.mlp[2].weight.std() < 0.025
        assert torch.count_nonzero(te.mlp[0].bias) == 0
    for mod in m.modules():
        if isinstance(mod, torch.nn.GroupNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0) and mod.eps == 1e-5
    # zero-initialised head: the untrained model predicts exactly 0
    with torch.no_grad():
        assert torch.count_nonzero(m(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([1]))) == 0


def test_zero_init_block_modulation_option():
    m = DiC_Tiny(num_classes=10, zero_init_block_modulation=True)
    for stages in (m.enc_blocks, m.lat_blocks, m.dec_blocks):
        for stage in stages:
            for block in stage:
                assert torch.count_nonzero(block.conv.affine[1].weight) == 0
                assert torch.count_nonzero(block.conv.affine[1].bias) == 0


#################################################################################
#                                 Training                                      #
#################################################################################

def test_every_parameter_gets_a_gradient():
    """No unused parameters (DDP without find_unused_parameters), and training moves the loss."""
    torch.manual_seed(0)
    model = DiC_Tiny(in_channels=1, num_classes=10).train()
    x, t, y = torch.randn(8, 1, 16, 16), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    model(x, t, y).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    randomize_(model, 0).zero_grad(set_to_none=True)
    model(x, t, y).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_dic_tiny_cpu_step_time():
    torch.manual_seed(0)
    model = DiC_Tiny(in_channels=1, input_size=16, num_classes=10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t, y = torch.randn(8, 1, 16, 16), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        loss = model(x, t, y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    assert min(times[1:]) < 0.2


def test_guidance_without_a_null_label_row_is_refused():
    model = DiC_Tiny(num_classes=10, class_dropout_prob=0.0)
    assert model.y_embedder_ls[0].embedding_table.num_embeddings == 10   # no null row to guide with
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="null-label row: build the model with class_dropout_prob > 0"):
        model.forward_with_cfg(x, torch.tensor([1, 1]), torch.tensor([3, 10]), 4.0)
