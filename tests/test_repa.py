"""helpers/training/repa.py: encoder names and loading (timm and official DINOv2 layouts, safetensors, folders,
position-embedding resampling, one-line errors), preprocessing numbers, target tokens, the projector,
the alignment loss and its averaging, and that generator and encoder tokens share one order."""
import math
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

from helpers.utils.cli import JobError
from helpers.training.repa import (ENCODERS, Projector, encoder_tokens, load_encoder, manifold_loss, preprocess,
                                   projection_loss, read_encoder_weights)

TINY = dict(depth=2, embed_dim=32, num_heads=2)   # a DINOv2-shaped ViT small enough for CPU tests


def tiny_vit(name="vit_small_patch14_dinov2", img_size=224, seed=0):
    """A random tiny DINOv2-layout ViT as timm builds it, with non-trivial norms and layer scales."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0, **TINY)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith("gamma") or "norm" in k:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_encoder_names_map_to_installed_timm_models_and_dims():
    assert len(ENCODERS) == 8 and set(ENCODERS) >= {"dinov2-vit-b", "dinov2-vit-b-reg", "dinov2-vit-g-reg"}
    installed = set(timm.list_models("*dinov2*"))
    with torch.device("meta"):
        for enc_type, (timm_name, dim, _) in ENCODERS.items():
            assert timm_name in installed, enc_type
            if enc_type.startswith(("dinov2-vit-s", "dinov2-vit-b")):
                model = timm.create_model(timm_name, pretrained=False, img_size=224, num_classes=0)
                assert model.embed_dim == dim and model.patch_embed.grid_size == (16, 16)
                assert model.num_prefix_tokens == (5 if enc_type.endswith("-reg") else 1)
    assert [ENCODERS[f"dinov2-vit-{s}"][1] for s in "sblg"] == [384, 768, 1024, 1536]


def test_load_timm_state_dict_same_outputs_frozen(tmp_path):
    saved = tiny_vit()
    path = tmp_path / "enc.pth"
    torch.save(saved.state_dict(), path)
    encoder = load_encoder("dinov2-vit-s", weights=str(path), resolution=256, **TINY)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    images = torch.randn(2, 3, 224, 224)
    start = time.perf_counter()
    tokens = encoder_tokens(encoder, images)
    print(f"tiny ViT (depth 2, dim 32) encoder_tokens on 2 x 224px: {1000 * (time.perf_counter() - start):.1f} ms")
    assert tokens.shape == (2, 256, 32) and not tokens.requires_grad
    with torch.no_grad():
        expected = saved.forward_features(images)[:, 1:]
    assert torch.equal(tokens, expected)
    # the final norm is applied: with weight w and bias b, each token's normalised value is (tok - b) / w
    unit = (tokens - encoder.norm.bias) / encoder.norm.weight
    torch.testing.assert_close(unit.mean(-1), torch.zeros(2, 256), atol=1e-5, rtol=0)
    torch.testing.assert_close(unit.var(-1, unbiased=False), torch.ones(2, 256), atol=1e-3, rtol=0)


def test_official_layout_at_518px_is_resampled_to_the_16x16_grid(tmp_path):
    """The release layout (mask_token, 1 + 37x37 positions) loads; positions = bicubic antialiased resize."""
    saved = tiny_vit(img_size=518)
    state_dict = saved.state_dict()
    assert state_dict["pos_embed"].shape == (1, 1 + 37 * 37, 32)
    state_dict["mask_token"] = torch.zeros(1, 32)
    torch.save({"model": state_dict}, tmp_path / "dinov2_vits14_pretrain.pth")
    encoder = load_encoder("dinov2-vit-s", weights=str(tmp_path), resolution=256, **TINY)   # a folder
    old = state_dict["pos_embed"]
    grid = old[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    new = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.cat([old[:, :1], new.permute(0, 2, 3, 1).reshape(1, 256, 32)], dim=1)
    torch.testing.assert_close(encoder.pos_embed, expected, atol=1e-6, rtol=0)
    assert torch.equal(encoder.blocks[1].mlp.fc2.weight, saved.blocks[1].mlp.fc2.weight)


def test_register_variant_from_safetensors_drops_five_prefix_tokens(tmp_path):
    from safetensors.torch import save_file
    saved = tiny_vit("vit_small_patch14_reg4_dinov2")
    save_file(saved.state_dict(), str(tmp_path / "enc.safetensors"))
    encoder = load_encoder("dinov2-vit-s-reg", weights=str(tmp_path / "enc.safetensors"), **TINY)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = saved.forward_features(images)
    assert expected.shape[1] == 5 + 256
    assert torch.equal(encoder_tokens(encoder, images), expected[:, 5:])


def test_loading_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.pth"
    torch.save(tiny_vit().state_dict(), wrong)
    (tmp_path / "two").mkdir()
    for name in ("a.pth", "b.safetensors"):
        (tmp_path / "two" / name).write_bytes(b"x")
    cases = [
        (dict(weights=str(tmp_path / "missing.pth"), **TINY), "do not exist"),
        (dict(weights=str(bad), **TINY), "cannot read encoder weights"),
        (dict(weights=str(tmp_path / "two"), **TINY), "holds 2 weights files"),
        (dict(weights=str(wrong), depth=2, embed_dim=64, num_heads=2), "do not fit dinov2-vit-s"),
    ]
    for kwargs, message in cases:
        with pytest.raises(JobError, match=message) as info:
            load_encoder("dinov2-vit-s", **kwargs)
        assert "\n" not in str(info.value) and "--enc-" in str(info.value)
    with pytest.raises(JobError, match="unknown encoder 'dinov2-vit-x'"):
        load_encoder("dinov2-vit-x")


def test_offline_without_weights_names_the_file_to_fetch():
    with pytest.raises(JobError) as info:
        load_encoder("dinov2-vit-b", weights=None, **TINY)
    msg = str(info.value)
    assert "\n" not in msg and "timm/vit_base_patch14_dinov2.lvd142m" in msg
    assert "dinov2_vitb14/dinov2_vitb14_pretrain.pth" in msg and "--enc-weights PATH" in msg


def test_read_encoder_weights_refuses_non_tensor_payloads(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2], path)
    with pytest.raises(JobError, match="not a state_dict of tensors"):
        read_encoder_weights(str(path))


def test_preprocess_numbers_uint8_and_float():
    u8 = torch.zeros(1, 3, 256, 256, dtype=torch.uint8)
    u8[:, 0], u8[:, 1], u8[:, 2] = 255, 0, 51
    expected = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225])
    for images in (u8, u8.float() / 127.5 - 1):      # the trainers' [-1, 1] pixels of the same image
        x = preprocess(images)
        assert x.shape == (1, 3, 224, 224)
        torch.testing.assert_close(x, expected.view(1, 3, 1, 1).expand(1, 3, 224, 224), atol=1e-5, rtol=0)
    assert preprocess(torch.zeros(2, 3, 512, 512)).shape == (2, 3, 448, 448)
    assert preprocess(torch.zeros(1, 3, 64, 64), resolution=256).shape == (1, 3, 224, 224)
    # a row ramp in [0, 1] keeps its centre value (bicubic reproduces a linear ramp inside the image)
    ramp = torch.linspace(-1, 1, 256).view(1, 1, 1, 256).expand(1, 3, 256, 256)
    mid = preprocess(ramp)[0, 0, 100, 111:113].mean()
    torch.testing.assert_close(mid, torch.tensor((0.5 - 0.485) / 0.229), atol=2e-3, rtol=0)


def test_projection_loss_closed_forms():
    z = torch.randn(2, 5, 8)
    loss, per_sample = projection_loss([z.clone()], [z])
    torch.testing.assert_close(loss, torch.tensor(-1.0))
    assert per_sample.shape == (2,)
    e0, e1 = torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    e0[..., 0], e1[..., 1] = 1, 1
    assert projection_loss(e0, e1)[0].item() == 0.0
    a, b = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    base = projection_loss(a, b)[1]
    torch.testing.assert_close(projection_loss(7.0 * a, 0.1 * b)[1], base)


def test_projection_loss_averaging_order_hand_case():
    """Encoder A has 1 token, encoder B 3: token-mean per encoder first, then encoders (not pooled)."""
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # sample 0: A token cos 1; B tokens cos 1, 0, 0  -> (-1 + -1/3) / 2 = -2/3
    # sample 1: A token cos 0; B tokens cos 1, 1, -1 -> (0 + -1/3) / 2 = -1/6
    a_pred, a_tgt = torch.stack([x, x]).view(2, 1, 2), torch.stack([x, y]).view(2, 1, 2)
    b_pred = torch.stack([torch.stack([x, x, x]), torch.stack([y, y, y])])
    b_tgt = torch.stack([torch.stack([x, y, y]), torch.stack([y, y, -y])])
    loss, per_sample = projection_loss([a_pred, b_pred], [a_tgt, b_tgt])
    torch.testing.assert_close(per_sample, torch.tensor([-2 / 3, -1 / 6]))
    torch.testing.assert_close(loss, torch.tensor((-2 / 3 - 1 / 6) / 2))
    # pooling all 4 tokens per sample would give (-2/4, -1/4): the order is what is checked here
    assert abs(loss.item() - (-0.5 - 0.25) / 2) > 0.03
    with pytest.raises(JobError, match="do not match encoder tokens"):
        projection_loss([a_pred], [b_tgt])


def test_projector_widths_and_conv_equals_linear():
    lin, conv = Projector(6, 5, hidden_dim=7), Projector(6, 5, hidden_dim=7, conv=True)
    assert [tuple(m.weight.shape) for m in lin.mlp if hasattr(m, "weight")] == [(7, 6), (7, 7), (5, 7)]
    assert [type(m) for m in lin.mlp] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    with torch.no_grad():
        for c, l in zip(conv.mlp, lin.mlp):
            if isinstance(c, nn.Conv2d):
                c.weight.copy_(l.weight[:, :, None, None])
                c.bias.copy_(l.bias)
    fmap = torch.randn(2, 6, 3, 4)
    tokens = fmap.flatten(2).transpose(1, 2)               # (2, 12, 6), row-major
    out = conv(fmap)
    assert out.shape == (2, 12, 5)
    torch.testing.assert_close(out, lin(tokens))
    torch.testing.assert_close(lin(fmap), lin(tokens))
    up = Projector(6, 5, hidden_dim=7, out_grid=(6, 8))(fmap)
    assert up.shape == (2, 48, 5)


def pooled_pixel_encoder(images, grid):
    """Fake encoder: the image average-pooled to the token grid, tokens row-major (B, T, 3)."""
    return F.adaptive_avg_pool2d(images, grid).flatten(2).transpose(1, 2)


def identity_projector(**kwargs):
    """A map projector whose MLP is the identity: only flattening (and resizing) remain."""
    proj = Projector(3, 3, hidden_dim=4, conv=True, **kwargs)
    proj.mlp = nn.Sequential()   # an empty Sequential: the identity
    return proj


def test_generator_and_encoder_token_orders_agree():
    images = torch.rand(2, 3, 32, 48)[..., :32] + 0.1       # positive, asymmetric content
    target = pooled_pixel_encoder(images, (16, 16))
    stage = F.adaptive_avg_pool2d(images, (16, 16))         # a generator "stage" seeing the same image
    assert projection_loss(identity_projector()(stage), target)[0].item() == pytest.approx(-1.0, abs=1e-6)
    transposed = projection_loss(identity_projector()(stage.transpose(-1, -2)), target)[0].item()
    assert transposed > -0.99
    # U-REPA's mid stage: an 8x8 map resized to the 16x16 tokens (nearest: exact for 2x2-constant images)
    blocky = F.interpolate(torch.rand(2, 3, 8, 8) + 0.1, scale_factor=4, mode="nearest")     # 32x32
    mid = F.adaptive_avg_pool2d(blocky, (8, 8))
    up = identity_projector(out_grid=(16, 16), upsample="nearest")(mid)
    assert projection_loss(up, pooled_pixel_encoder(blocky, (16, 16)))[0].item() == pytest.approx(-1.0, abs=1e-6)


def test_projector_starts_as_repas():
    """REPA's initialize_weights reaches the projector: xavier-uniform weights, zero biases, drawn after
    the layers' default init (an independent re-statement under the same seed); the 1x1-conv form
    draws the same values."""
    torch.manual_seed(4)
    layers = [nn.Linear(6, 7), nn.Linear(7, 7), nn.Linear(7, 5)]       # PyTorch's default draws first
    for layer in layers:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.constant_(layer.bias, 0)
    torch.manual_seed(4)
    lin = Projector(6, 5, hidden_dim=7)
    torch.manual_seed(4)
    conv = Projector(6, 5, hidden_dim=7, conv=True)
    got = [m for m in lin.mlp if isinstance(m, nn.Linear)]
    convs = [m for m in conv.mlp if isinstance(m, nn.Conv2d)]
    for layer, mine, c in zip(layers, got, convs):
        assert torch.equal(mine.weight, layer.weight) and torch.equal(c.weight[:, :, 0, 0], layer.weight)
        assert torch.count_nonzero(mine.bias) == 0 and torch.count_nonzero(c.bias) == 0
    big = Projector(384, 768)   # REPA's sizes: |w| <= sqrt(6 / (fan_in + fan_out))
    for m, (fan_in, fan_out) in zip(big.mlp[::2], [(384, 2048), (2048, 2048), (2048, 768)]):
        assert m.weight.abs().max().item() <= math.sqrt(6 / (fan_in + fan_out))
        assert m.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.02)


def test_mid_stage_projector_upsamples_after_its_mlp():
    """U-REPA's order: the MLP runs on the small map, its output is resized (bilinear) to the token grid."""
    torch.manual_seed(0)
    proj = Projector(6, 5, hidden_dim=7, conv=True, out_grid=(4, 4))
    fmap = torch.randn(2, 6, 2, 2)
    after = F.interpolate(proj.mlp(fmap), size=(4, 4), mode="bilinear", align_corners=False)
    before = proj.mlp(F.interpolate(fmap, size=(4, 4), mode="bilinear", align_corners=False))
    out = proj(fmap)
    torch.testing.assert_close(out, after.flatten(2).transpose(1, 2))
    assert (out - before.flatten(2).transpose(1, 2)).abs().max() > 1e-3   # the other order differs


def test_alignment_losses_are_fp32_under_fp16_autocast():
    """fp16 features whose norms overflow fp16 (|z| ~ 1.2e5 > 65504): REPA issue #46. The losses are
    finite and equal the fp32 ones; normalising in fp16 gives a zero cosine instead."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(2, 5, 256, generator=g) * 8e3).half()
    b = (a.float() + torch.randn(2, 5, 256, generator=g) * 8e3).half()
    assert a.isfinite().all() and b.isfinite().all() and a.float().norm(dim=-1).min() > 65504
    expected_proj, expected_manifold = projection_loss(a.float(), b.float())[0], manifold_loss(a.float(), b.float())[0]
    with torch.autocast("cpu", dtype=torch.float16):
        proj, manifold = projection_loss(a, b)[0], manifold_loss(a, b)[0]
        fp16 = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).mean()
    assert proj.dtype == manifold.dtype == torch.float32 and proj.isfinite() and manifold.isfinite()
    torch.testing.assert_close(proj, expected_proj, rtol=1e-6, atol=0)
    torch.testing.assert_close(manifold, expected_manifold, rtol=1e-6, atol=0)
    assert expected_proj.item() < -0.5 and fp16.item() == 0.0


def test_manifold_loss_hand_case():
    """Per sample: mean over the T x T token pairs of (cos_h(i, j) - cos_y(i, j))^2.
    Tokens y = (1, 0), (0, 1): cos_y = [[1, 0], [0, 1]].
    sample 0: h = (1, 0), (1, 1): cos_h off-diagonal 1/sqrt(2) -> 2 * 1/2 over 4 pairs = 0.25
    sample 1: h = (1, 0), (-1, 0): off-diagonal -1          -> 2 * 1 over 4 pairs   = 0.5"""
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]] * 2)
    h = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [-1.0, 0.0]]])
    loss, per_sample = manifold_loss(h, y)
    torch.testing.assert_close(per_sample, torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(loss, torch.tensor(0.375))
    # two encoders: their per-sample values are averaged (encoder 2: h equal to y, 0)
    torch.testing.assert_close(manifold_loss([h, y], [y, y])[1], torch.tensor([0.125, 0.25]))
    with pytest.raises(JobError, match="do not match encoder tokens"):
        manifold_loss(h, y[:, :1])


def test_manifold_loss_is_zero_for_the_same_similarity_structure():
    """Positive per-token scales and a rotation of the feature space keep every token-pair cosine."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 16, 8, generator=g)
    scale = torch.rand(2, 16, 1, generator=g) * 5 + 0.1
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    for h in (y * scale, y @ rotation, (y * scale) @ rotation):
        assert manifold_loss(h, y)[0].item() == pytest.approx(0.0, abs=1e-10)
    assert manifold_loss(torch.randn(2, 16, 8, generator=g), y)[0].item() > 0.05
    assert manifold_loss(-y, y)[0].item() == pytest.approx(0.0, abs=1e-10)   # sign flips every h: cosines kept
