"""DiT family: official keys/shapes/parameter counts, DiT's init, and forward numerics re-derived by hand.

The expected key list is written out here from the official layout (and also compared with the spec's
key dumps copied into tests/data/spec_keys); parameter counts are literal numbers.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dit_models
from dit_models import DiT, DiT_models

SPEC_KEYS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "spec_keys")

# name -> (depth, hidden, heads, patch)
CONFIGS = {
    f"DiT-{size}/{p}": (depth, hidden, heads, p)
    for size, depth, hidden, heads in [("XL", 28, 1152, 16), ("L", 24, 1024, 16), ("B", 12, 768, 12),
                                       ("S", 12, 384, 6)]
    for p in (2, 4, 8)
}

# sum(p.numel() for p in model.parameters()) at input_size 32 (256px), pos_embed included. The patch-2
# figures are DiT's published table (DiT-XL/2: 675,129,632); the others are the sums of the official
# key dumps.
PARAM_COUNTS = {
    "DiT-S/2": 32_963_360, "DiT-S/4": 32_945_024, "DiT-S/8": 33_148_160,
    "DiT-B/2": 130_512_416, "DiT-B/4": 130_475_648, "DiT-B/8": 130_881_536,
    "DiT-L/2": 458_102_816, "DiT-L/4": 458_053_760, "DiT-L/8": 458_594_816,
    "DiT-XL/2": 675_129_632, "DiT-XL/4": 675_074_432, "DiT-XL/8": 675_683_072,
}


def official_shapes(depth, hidden, patch, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True):
    """Key -> shape of an official DiT state_dict, in the official order."""
    out_channels = 2 * in_channels if learn_sigma else in_channels
    shapes = {
        "pos_embed": [1, (input_size // patch) ** 2, hidden],
        "x_embedder.proj.weight": [hidden, in_channels, patch, patch],
        "x_embedder.proj.bias": [hidden],
        "t_embedder.mlp.0.weight": [hidden, 256],
        "t_embedder.mlp.0.bias": [hidden],
        "t_embedder.mlp.2.weight": [hidden, hidden],
        "t_embedder.mlp.2.bias": [hidden],
        "y_embedder.embedding_table.weight": [num_classes + 1, hidden],
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": [3 * hidden, hidden], b + "attn.qkv.bias": [3 * hidden],
            b + "attn.proj.weight": [hidden, hidden], b + "attn.proj.bias": [hidden],
            b + "mlp.fc1.weight": [4 * hidden, hidden], b + "mlp.fc1.bias": [4 * hidden],
            b + "mlp.fc2.weight": [hidden, 4 * hidden], b + "mlp.fc2.bias": [hidden],
            b + "adaLN_modulation.1.weight": [6 * hidden, hidden], b + "adaLN_modulation.1.bias": [6 * hidden],
        })
    shapes.update({
        "final_layer.linear.weight": [patch * patch * out_channels, hidden],
        "final_layer.linear.bias": [patch * patch * out_channels],
        "final_layer.adaLN_modulation.1.weight": [2 * hidden, hidden],
        "final_layer.adaLN_modulation.1.bias": [2 * hidden],
    })
    return shapes


def shapes_of(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def random_state_dict(shapes, seed=0, std=0.2):
    """Official-layout state_dict of random tensors (pos_embed random too: it must be used as stored)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * std for k, s in shapes.items()}


def sincos_table(dim, grid):
    """Independent 2-D sin-cos table: token n = i * grid + j (row i, column j);
    channels [sin(j w) | cos(j w) | sin(i w) | cos(i w)], w_k = 10000^(-k / (dim / 4))."""
    q = dim // 4
    w = 10000.0 ** (-np.arange(q, dtype=np.float64) / q)
    table = np.zeros((grid * grid, dim))
    for i in range(grid):
        for j in range(grid):
            n = i * grid + j
            table[n] = np.concatenate([np.sin(j * w), np.cos(j * w), np.sin(i * w), np.cos(i * w)])
    return table


# ------------------------------------------------------------------------------------------------
# Registry, keys, shapes, parameter counts
# ------------------------------------------------------------------------------------------------

def test_registry_has_all_twelve_variants():
    assert list(DiT_models) == ["DiT-XL/2", "DiT-XL/4", "DiT-XL/8", "DiT-L/2", "DiT-L/4", "DiT-L/8",
                                "DiT-B/2", "DiT-B/4", "DiT-B/8", "DiT-S/2", "DiT-S/4", "DiT-S/8"]
    assert DiT_models["DiT-XL/2"] is dit_models.DiT_XL_2
    assert DiT_models["DiT-S/8"] is dit_models.DiT_S_8


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_variant_keys_shapes_and_count_on_meta(name):
    depth, hidden, heads, patch = CONFIGS[name]
    with torch.device("meta"):
        model = DiT_models[name]()
    assert shapes_of(model) == official_shapes(depth, hidden, patch)
    assert list(model.state_dict()) == list(official_shapes(depth, hidden, patch))  # same order too
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    assert len(model.blocks) == depth and model.num_heads == heads and model.patch_size == patch


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_variant_matches_spec_key_dump(name):
    path = os.path.join(SPEC_KEYS_DIR, name.replace("/", "-") + ".json")
    with open(path) as f:
        expected = json.load(f)
    with torch.device("meta"):
        model = DiT_models[name]()
    assert shapes_of(model) == expected
    assert sum(math.prod(s) for s in expected.values()) == PARAM_COUNTS[name]


def test_patch2_counts_are_the_paper_table():
    assert PARAM_COUNTS["DiT-S/2"] == 32_963_360
    assert PARAM_COUNTS["DiT-B/2"] == 130_512_416
    assert PARAM_COUNTS["DiT-L/2"] == 458_102_816
    assert PARAM_COUNTS["DiT-XL/2"] == 675_129_632
    # The table counts pos_embed (256 tokens x 1152 for XL/2); without it the sum would be smaller.
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 675_129_632 - 256 * 1152


@pytest.fixture(scope="module")
def dit_s2():
    torch.manual_seed(0)
    return DiT_models["DiT-S/2"]()


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4"])
def test_real_build_keys_shapes_counts(name, dit_s2):
    depth, hidden, heads, patch = CONFIGS[name]
    if name == "DiT-S/2":
        model = dit_s2
    else:
        torch.manual_seed(0)
        model = DiT_models[name]()
    assert shapes_of(model) == official_shapes(depth, hidden, patch)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    assert (model.in_channels, model.out_channels, model.input_size, model.num_classes, model.learn_sigma) \
        == (4, 8, 32, 1000, True)


def test_constructor_kwargs_and_attributes():
    model = DiT(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                mlp_ratio=2.0, class_dropout_prob=0.1, num_classes=7, learn_sigma=False)
    assert (model.in_channels, model.out_channels, model.input_size, model.num_classes, model.learn_sigma) \
        == (3, 3, 16, 7, False)
    assert model.pos_embed.shape == (1, 16, 32)
    assert model.blocks[0].mlp.fc1.weight.shape == (64, 32)
    assert model.y_embedder.embedding_table.weight.shape == (8, 32)
    assert model.final_layer.linear.weight.shape == (4 * 4 * 3, 32)
    model.eval()
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 7]))
    assert out.shape == (2, 3, 16, 16)


def test_no_null_row_without_class_dropout():
    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=5,
                class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.weight.shape == (5, 32)  # as DiT: no null row when p = 0
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="null-label row"):
        model.forward_with_cfg(x, torch.tensor([1, 1]), torch.tensor([0, 5]), 4.0)


def test_does_not_import_timm():
    code = "import sys, dit_models; assert 'timm' not in sys.modules, 'timm imported'"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=repo)


# ------------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------------

def test_pos_embed_is_fixed_sincos_in_state_dict(dit_s2):
    assert isinstance(dit_s2.pos_embed, torch.nn.Parameter) and not dit_s2.pos_embed.requires_grad
    assert "pos_embed" in dit_s2.state_dict()
    expected = sincos_table(384, 16)
    assert dit_s2.pos_embed.dtype == torch.float32
    np.testing.assert_allclose(dit_s2.pos_embed[0].numpy(), expected, rtol=0, atol=1e-6)
    # Spot values: token (row 0, col 1) channel 0 is sin(1); token (row 1, col 0) channel 192 is sin(1).
    assert dit_s2.pos_embed[0, 1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-7)
    assert dit_s2.pos_embed[0, 16, 192].item() == pytest.approx(math.sin(1.0), abs=1e-7)
    assert dit_s2.pos_embed[0, 16, 0].item() == 0.0 and dit_s2.pos_embed[0, 1, 192].item() == 0.0
    # Also for a patch-8 grid (4x4) and another width.
    model = DiT(input_size=32, patch_size=8, hidden_size=64, depth=1, num_heads=2)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), sincos_table(64, 4), rtol=0, atol=1e-6)


def test_dit_initialisation(dit_s2):
    m = dit_s2
    # adaLN-Zero and a zero output layer: every modulation Linear and the final Linear are zero.
    for block in m.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[1].bias) == 0
    for lin in (m.final_layer.adaLN_modulation[1], m.final_layer.linear):
        assert torch.count_nonzero(lin.weight) == 0 and torch.count_nonzero(lin.bias) == 0
    # Xavier-uniform Linears with zero biases: |w| <= sqrt(6 / (fan_in + fan_out)), std = bound / sqrt(3).
    for lin in (m.blocks[0].attn.qkv, m.blocks[3].mlp.fc1, m.blocks[11].attn.proj):
        fan_out, fan_in = lin.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert lin.weight.abs().max().item() <= bound
        assert lin.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
        assert torch.count_nonzero(lin.bias) == 0
    # Patch embedding: xavier on the flattened (384, 4*2*2) kernel.
    w = m.x_embedder.proj.weight
    bound = math.sqrt(6.0 / (384 + 16))
    assert w.abs().max().item() <= bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # Label table and timestep MLP weights ~ N(0, 0.02), timestep MLP biases zero.
    for weight in (m.y_embedder.embedding_table.weight, m.t_embedder.mlp[0].weight, m.t_embedder.mlp[2].weight):
        assert weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.count_nonzero(m.t_embedder.mlp[0].bias) == 0
    # So a fresh model predicts exactly zero.
    m.eval()
    with torch.no_grad():
        out = m(torch.randn(2, 4, 32, 32), torch.tensor([3, 700]), torch.tensor([1, 1000]))
    assert torch.count_nonzero(out) == 0


def official_fresh_state_dict(seed, depth, hidden, patch, input_size, in_channels=4, num_classes=1000):
    """A fresh official DiT (learn_sigma) under torch.manual_seed(seed), re-stated from the official
    models.py: its modules are built in DiT.__init__'s order (x_embedder = timm's PatchEmbed Conv2d,
    t_embedder, y_embedder, pos_embed, blocks, final_layer), each drawing PyTorch's default init from
    the global RNG, then initialize_weights runs in its order. Returns {official key: tensor}."""
    torch.manual_seed(seed)
    h, out = hidden, patch * patch * 2 * in_channels
    patch_conv = torch.nn.Conv2d(in_channels, h, kernel_size=patch, stride=patch, bias=True)
    t0, t2 = torch.nn.Linear(256, h), torch.nn.Linear(h, h)
    table = torch.nn.Embedding(num_classes + 1, h)
    names = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    blocks = [dict(zip(names, (torch.nn.Linear(h, 3 * h), torch.nn.Linear(h, h), torch.nn.Linear(h, 4 * h),
                               torch.nn.Linear(4 * h, h), torch.nn.Linear(h, 6 * h)))) for _ in range(depth)]
    final_linear, final_ada = torch.nn.Linear(h, out), torch.nn.Linear(h, 2 * h)
    # initialize_weights: self.apply(_basic_init) visits the Linears in registration order.
    for linear in [t0, t2] + [lin for block in blocks for lin in block.values()] + [final_linear, final_ada]:
        torch.nn.init.xavier_uniform_(linear.weight)
        torch.nn.init.constant_(linear.bias, 0)
    pos_embed = torch.from_numpy(sincos_table(h, input_size // patch)).float().unsqueeze(0)
    w = patch_conv.weight.data
    torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    torch.nn.init.constant_(patch_conv.bias, 0)
    torch.nn.init.normal_(table.weight, std=0.02)
    torch.nn.init.normal_(t0.weight, std=0.02)
    torch.nn.init.normal_(t2.weight, std=0.02)
    for lin in [block["adaLN_modulation.1"] for block in blocks] + [final_ada, final_linear]:
        torch.nn.init.constant_(lin.weight, 0)
        torch.nn.init.constant_(lin.bias, 0)
    sd = {"pos_embed": pos_embed, "x_embedder.proj.weight": patch_conv.weight, "x_embedder.proj.bias": patch_conv.bias,
          "t_embedder.mlp.0.weight": t0.weight, "t_embedder.mlp.0.bias": t0.bias,
          "t_embedder.mlp.2.weight": t2.weight, "t_embedder.mlp.2.bias": t2.bias,
          "y_embedder.embedding_table.weight": table.weight}
    for i, block in enumerate(blocks):
        for name, lin in block.items():
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = lin.weight, lin.bias
    sd.update({"final_layer.linear.weight": final_linear.weight, "final_layer.linear.bias": final_linear.bias,
               "final_layer.adaLN_modulation.1.weight": final_ada.weight,
               "final_layer.adaLN_modulation.1.bias": final_ada.bias})
    return {k: v.detach() for k, v in sd.items()}


def test_fresh_dit_equals_the_official_initialisation_tensor_for_tensor():
    """Same seed, same tensors as official DiT's __init__ + initialize_weights, the patch bias zeroed."""
    expected = official_fresh_state_dict(seed=3, depth=12, hidden=384, patch=2, input_size=8)
    torch.manual_seed(3)
    got = DiT_models["DiT-S/2"](input_size=8).state_dict()
    assert list(got) == list(expected) and len(got) == 132
    equal = [k for k in expected if torch.equal(got[k], expected[k])]
    assert len(equal) == 132, sorted(set(expected) - set(equal))
    assert torch.count_nonzero(got["x_embedder.proj.bias"]) == 0


# ------------------------------------------------------------------------------------------------
# Loading official checkpoints and forward numerics
# ------------------------------------------------------------------------------------------------

def test_official_layout_state_dict_loads_strict_and_runs():
    sd = random_state_dict(official_shapes(12, 384, 2), std=0.02)
    model = DiT_models["DiT-S/2"]()
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.pos_embed, sd["pos_embed"])  # used as stored, not recomputed
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 32, 32), torch.tensor([0, 999]), torch.tensor([5, 1000]))
    assert out.shape == (2, 8, 32, 32)
    assert torch.isfinite(out).all() and out.abs().max() > 0


def hand_forward(sd, x, t, y, patch, heads, out_channels):
    """DiT forward written from the paper's equations with raw ops on a state_dict (float64)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    N, C, H, W = x.shape
    p, h, w = patch, H // patch, W // patch
    D = sd["pos_embed"].shape[-1]
    # Patchify by explicit slicing: token n = i * w + j holds the (C, p, p) patch at row i, column j.
    tokens = torch.stack([x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(N, -1)
                          for i in range(h) for j in range(w)], dim=1)            # (N, T, C*p*p)
    z = tokens @ sd["x_embedder.proj.weight"].reshape(D, -1).T + sd["x_embedder.proj.bias"]
    z = z + sd["pos_embed"]
    # Timestep: 256 features [cos(t f_k) | sin(t f_k)], f_k = exp(-ln(10000) k / 128). DiT defines the
    # phases t * f_k in float32 (at t = 999 their rounding is ~1e-4 rad), so they are formed in float32 here.
    f = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = (t.float()[:, None] * f[None]).double()
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]

    def ln(v):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6)

    def gelu_tanh(v):
        return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    hd = D // heads
    for b in range(depth):
        g = lambda name: sd[f"blocks.{b}.{name}"]  # noqa: E731
        mod = F.linear(F.silu(c), g("adaLN_modulation.1.weight"), g("adaLN_modulation.1.bias"))
        shift_msa, scale_msa, gate_msa = mod[:, 0:D], mod[:, D:2 * D], mod[:, 2 * D:3 * D]
        shift_mlp, scale_mlp, gate_mlp = mod[:, 3 * D:4 * D], mod[:, 4 * D:5 * D], mod[:, 5 * D:6 * D]
        a = ln(z) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        qkv = F.linear(a, g("attn.qkv.weight"), g("attn.qkv.bias"))              # (N, T, 3D)
        outs = []
        for head in range(heads):
            q = qkv[..., 0 * D + head * hd: 0 * D + (head + 1) * hd]
            k = qkv[..., 1 * D + head * hd: 1 * D + (head + 1) * hd]
            v = qkv[..., 2 * D + head * hd: 2 * D + (head + 1) * hd]
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
            outs.append(att @ v)
        z = z + gate_msa[:, None] * F.linear(torch.cat(outs, -1), g("attn.proj.weight"), g("attn.proj.bias"))
        m = ln(z) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        m = F.linear(gelu_tanh(F.linear(m, g("mlp.fc1.weight"), g("mlp.fc1.bias"))),
                     g("mlp.fc2.weight"), g("mlp.fc2.bias"))
        z = z + gate_mlp[:, None] * m
    mod = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    shift, scale = mod[:, :D], mod[:, D:]
    z = F.linear(ln(z) * (1 + scale[:, None]) + shift[:, None],
                 sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])     # (N, T, p*p*C_out)
    # Unpatchify: each token's values are laid out (p, p, C_out).
    img = torch.zeros(N, out_channels, H, W, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = z[:, i * w + j].reshape(N, p, p, out_channels) \
                .permute(0, 3, 1, 2)
    return img


TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def tiny_model_and_sd(seed=0, **overrides):
    kw = {**TINY, **overrides}
    shapes = official_shapes(kw["depth"], kw["hidden_size"], kw["patch_size"], input_size=kw["input_size"],
                             in_channels=kw["in_channels"], num_classes=kw["num_classes"],
                             learn_sigma=kw.get("learn_sigma", True))
    sd = random_state_dict(shapes, seed=seed, std=0.15)
    model = DiT(**kw)
    model.load_state_dict(sd, strict=True)
    return model.eval(), sd


def test_forward_equals_hand_computation():
    model, sd = tiny_model_and_sd()
    torch.manual_seed(1)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 17, 999])
    y = torch.tensor([3, 10, 0])  # 10 = null label
    with torch.no_grad():
        out = model(x, t, y)
    ref = hand_forward(sd, x, t, y, patch=2, heads=2, out_channels=8)
    assert out.shape == (3, 8, 8, 8)
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert ref.abs().max().item() > 0.1  # the comparison is not between two near-zero tensors
    # Float timesteps give the same result for integer values, and fractional ones are accepted.
    with torch.no_grad():
        assert torch.equal(model(x, t.float(), y), out)
        frac = model(x, torch.tensor([0.5, 17.25, 998.9]), y)
    ref_frac = hand_forward(sd, x, torch.tensor([0.5, 17.25, 998.9]), y, patch=2, heads=2, out_channels=8)
    assert (frac.double() - ref_frac).abs().max().item() < 1e-5


def test_forward_equals_hand_computation_patch4_no_sigma():
    model, sd = tiny_model_and_sd(seed=3, patch_size=4, input_size=12, in_channels=3, depth=1,
                                  learn_sigma=False)
    x = torch.randn(2, 3, 12, 12)
    t, y = torch.tensor([5, 400]), torch.tensor([9, 2])
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, 3, 12, 12)
    assert (out.double() - hand_forward(sd, x, t, y, patch=4, heads=2, out_channels=3)).abs().max() < 1e-5


def test_label_dropout():
    model, sd = tiny_model_and_sd()
    table = sd["y_embedder.embedding_table.weight"]
    labels = torch.tensor([1, 2, 3, 4])
    emb = model.y_embedder(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert torch.equal(emb, table[[10, 2, 10, 4]])
    assert torch.equal(model.y_embedder(labels, train=False), table[labels])  # eval: no dropout
    model.y_embedder.dropout_prob = 1.0
    assert torch.equal(model.y_embedder(labels, train=True), table[[10] * 4])   # train, p = 1: all dropped
    model.y_embedder.dropout_prob = 0.1
    torch.manual_seed(0)
    dropped = sum((model.y_embedder.token_drop(torch.zeros(1000, dtype=torch.long)) == 10).sum().item()
                  for _ in range(10))
    assert 850 <= dropped <= 1150  # ~10% of 10,000


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg_setup():
    model, _ = tiny_model_and_sd(seed=5)
    torch.manual_seed(2)
    half = torch.randn(2, 4, 8, 8)
    x = torch.cat([half, torch.randn(2, 4, 8, 8)])  # the second half is ignored: the first is reused
    t = torch.tensor([50, 700, 50, 700])
    y = torch.tensor([1, 6, 10, 10])
    with torch.no_grad():
        raw = model(torch.cat([half, half]), t, y)
    assert (raw[:2] - raw[2:]).abs().max() > 1e-3  # conditional and unconditional really differ
    return model, half, x, t, y, raw


def guided(raw, s, g):
    cond, uncond = raw[:2, :g], raw[2:, :g]
    eps = uncond + s * (cond - uncond)
    return torch.cat([torch.cat([eps, eps]), raw[:, g:]], dim=1)


def test_cfg_scale_one_equals_conditional_forward(cfg_setup):
    model, half, x, t, y, raw = cfg_setup
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, 1.0, guide_channels="all")
        cond = model(half, t[:2], y[:2])
    assert out.shape == (4, 8, 8, 8)
    assert (out[:2] - cond).abs().max() < 1e-5
    assert (out[2:, :4] - cond[:, :4]).abs().max() < 1e-5


@pytest.mark.parametrize("guide, g", [(None, 3), ("all", 4), (4, 4), (2, 2), (1, 1)])
def test_cfg_guided_channels(cfg_setup, guide, g):
    model, half, x, t, y, raw = cfg_setup
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, 4.0, guide_channels=guide)
    expected = guided(raw, 4.0, g)
    assert (out - expected).abs().max() < 1e-5
    # Unguided latent channels pass through per half (cond and uncond differ there).
    if g < 4:
        assert (out[:2, g:4] - raw[:2, g:4]).abs().max() < 1e-6
        assert (out[2:, g:4] - raw[2:, g:4]).abs().max() < 1e-6


def test_cfg_default_guides_three_channels_only(cfg_setup):
    model, half, x, t, y, raw = cfg_setup
    with torch.no_grad():
        default = model.forward_with_cfg(x, t, y, 4.0)
        every = model.forward_with_cfg(x, t, y, 4.0, guide_channels="all")
    assert (default[:, :3] - every[:, :3]).abs().max() < 1e-6
    assert (default[:, 3] - every[:, 3]).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [0, 5, "some", 2.0, True])
def test_cfg_bad_guide_channels(cfg_setup, bad):
    model, half, x, t, y, raw = cfg_setup
    with pytest.raises(ValueError, match="guide_channels"):
        model.forward_with_cfg(x, t, y, 4.0, guide_channels=bad)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def test_input_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match=r"^input_size 30 is not divisible by patch_size 4$"):
        DiT_models["DiT-S/4"](input_size=30)


def test_wrong_input_resolution_at_forward():
    model = DiT(**TINY).eval()
    with pytest.raises(ValueError, match="built for input_size 8"):
        model(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([1]))


def test_heads_must_divide_hidden():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiT(input_size=8, patch_size=2, hidden_size=36, depth=1, num_heads=5)
