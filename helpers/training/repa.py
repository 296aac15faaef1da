"""REPA (representation alignment, Yu et al. ICLR 2025) and its U-Net form (U-REPA): the frozen
DINOv2 encoder, its input preprocessing and target tokens, the projector and the alignment loss.
Facts in /work/shared/spec/REPA.md. Independent of the training loop: a trainer calls

    encoder = load_encoder("dinov2-vit-b", weights=args.enc_weights, resolution=256)
    projector = Projector(model.feature_channels(stage), encoder.embed_dim, conv=is_dic)
    out, feats = model(x_t, t, y, return_features=(stage,))          # one forward
    z = encoder_tokens(encoder, preprocess(images))                  # (B, T, D_enc), no grad
    loss_proj, per_sample = projection_loss([projector(feats[stage])], [z])
    loss_manifold, _ = manifold_loss([projector(feats[stage])], [z])  # U-REPA's token-pair structure term

Token order everywhere: row-major (h, then w), the ViT's patch order (and DiT's).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.utils.cli import JobError, one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s}14/dinov2_vit{s}14{reg}_pretrain.pth"

# REPA's --enc-type names -> (timm model name, embed dim, official release size letter)
ENCODERS = {}
for _size, _timm, _dim in (("s", "small", 384), ("b", "base", 768), ("l", "large", 1024), ("g", "giant", 1536)):
    ENCODERS[f"dinov2-vit-{_size}"] = (f"vit_{_timm}_patch14_dinov2", _dim, _size)
    ENCODERS[f"dinov2-vit-{_size}-reg"] = (f"vit_{_timm}_patch14_reg4_dinov2", _dim, _size)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def encoder_input_size(resolution):
    """REPA's encoder input side: 224 px per 256 px of image (16x16 patches of 14 px at 256)."""
    return 224 * resolution // 256


def _fetch_hint(enc_type):
    """Where an offline user gets the weights of enc_type, said in one line."""
    timm_name, _, size = ENCODERS[enc_type]
    reg = "_reg4" if enc_type.endswith("-reg") else ""
    return (f"fetch timm/{timm_name}.lvd142m (Hugging Face hub) or {OFFICIAL_URL.format(s=size, reg=reg)} "
            f"and pass it with --enc-weights PATH")


def _weights_file(path):
    """The one weights file at `path` (itself, or the single weights file in a folder)."""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES))
        if len(found) != 1:
            raise JobError(f"encoder weights folder {path} holds {len(found)} weights files {found[:4]}; "
                           f"pass the file itself with --enc-weights PATH")
        path = os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise JobError(f"encoder weights {path} do not exist; pass a DINOv2 weights file with --enc-weights PATH")
    return path


def read_encoder_weights(path):
    """A state_dict from a .safetensors file or a torch file (weights_only); unwraps {'model': ...}."""
    path = _weights_file(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state_dict = load_file(path, device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to replace
        raise JobError(f"cannot read encoder weights {path}: not a tensor-only torch or safetensors file "
                       f"({type(e).__name__}); pass a timm or official DINOv2 state_dict (.pth or "
                       f".safetensors) with --enc-weights PATH") from None
    for key in ("model", "state_dict"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise JobError(f"encoder weights {path} are not a state_dict of tensors; pass a timm or official "
                       f"DINOv2 state_dict with --enc-weights PATH")
    return dict(state_dict)


def load_encoder(enc_type, weights=None, resolution=256, device="cpu", **model_kwargs):
    """The frozen DINOv2 of REPA (eval, no grad) built by timm for 224 * resolution / 256 px inputs.

    weights: a timm state_dict (any image size: the position embedding is resampled to the grid),
    the official dinov2_vit*14[_reg4]_pretrain.pth, a .safetensors file, or a folder with one of
    them; None downloads through timm (needs internet). model_kwargs go to timm.create_model
    (tests build tiny ViTs with depth/embed_dim/num_heads).
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    if enc_type not in ENCODERS:
        raise JobError(f"unknown encoder {enc_type!r}; use one of {', '.join(ENCODERS)} (--enc-type)")
    timm_name = ENCODERS[enc_type][0]
    build = dict(img_size=encoder_input_size(resolution), num_classes=0, **model_kwargs)
    if weights is None:
        try:
            encoder = timm.create_model(timm_name, pretrained=True, **build)
        except Exception as e:  # noqa: BLE001 - offline hub access fails in many ways
            raise JobError(f"cannot download {enc_type} weights ({one_line(e)}); {_fetch_hint(enc_type)}") from None
    else:
        encoder = timm.create_model(timm_name, pretrained=False, **build)
        state_dict = read_encoder_weights(weights)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        try:
            state_dict = checkpoint_filter_fn(state_dict, encoder)   # official layout, pos-embed resampling
            encoder.load_state_dict(state_dict, strict=True)
        except Exception as e:  # noqa: BLE001 - shape or key mismatch: wrong file for this encoder
            raise JobError(f"encoder weights {weights} do not fit {enc_type} (timm {timm_name}): "
                           f"{one_line(e)}; pass the {enc_type} weights or the matching --enc-type") from None
    return encoder.to(device).eval().requires_grad_(False)


def preprocess(images, resolution=None):
    """REPA's encoder input from training pixels: to [0, 1], ImageNet mean/std, bicubic to 224 * res / 256.

    images: (B, 3, H, W) uint8 in [0, 255], or float in [-1, 1] (the trainers' pixel batches,
    x = 2 * u8 / 255 - 1). resolution defaults to the image side H.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise JobError(f"REPA images must be (B, 3, H, W), got {tuple(images.shape)}; pass RGB pixel batches")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else (images.float() + 1) / 2
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    size = encoder_input_size(resolution or images.shape[-2])
    return F.interpolate(x, size=(size, size), mode="bicubic")


@torch.no_grad()
def encoder_tokens(encoder, images):
    """Target y*: the encoder's final-normed patch tokens (B, T, D), CLS and register tokens dropped."""
    tokens = encoder.forward_features(images)            # (B, prefix + T, D) after the final norm
    return tokens[:, encoder.num_prefix_tokens:]


class Projector(nn.Module):
    """h_phi: REPA's per-token MLP D -> 2048 -> 2048 -> z_dim with SiLU; returns tokens (B, T, z_dim).

    conv=True builds the same MLP from 1x1 Conv2d (DiC's checkpoint layout; applied as Linears, the
    same function, see per_token). Input (B, T, D) tokens or a
    (B, C, H, W) map, flattened row-major. out_grid=(h, w): a map is resized after projection to the
    encoder's token grid (U-REPA's mid stage), bilinear by default (align_corners=False), AFTER the
    MLP: U-REPA's best order (after-MLP 5.72 FID vs before-MLP 5.84).
    """

    def __init__(self, in_dim, z_dim, hidden_dim=2048, conv=False, out_grid=None, upsample="bilinear"):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, kernel_size=1)) if conv else nn.Linear
        self.mlp = nn.Sequential(layer(in_dim, hidden_dim), nn.SiLU(), layer(hidden_dim, hidden_dim), nn.SiLU(),
                                 layer(hidden_dim, z_dim))
        self.conv = conv
        self.out_grid = tuple(out_grid) if out_grid is not None else None
        self.upsample = upsample
        self.reset_parameters()

    def reset_parameters(self):
        """REPA's init (its SiT initialize_weights reaches the projectors): xavier-uniform weights and zero
        biases on every layer, not PyTorch's default. A 1x1 conv has the Linear's fans, so both forms
        draw the same values."""
        for layer in self.mlp:
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def per_token(self, tokens):
        """The MLP on (..., D) tokens, a 1x1-conv layer applied as the Linear it is (same weights, same
        function): PyTorch's CPU convolution of small maps is several times slower than the matmul
        (about 9x measured on a 2x2 map, 64 -> 2048 -> 2048 channels, the tests' U-REPA mid stage)."""
        for layer in self.mlp:
            conv = isinstance(layer, nn.Conv2d)
            tokens = F.linear(tokens, layer.weight.flatten(1), layer.bias) if conv else layer(tokens)
        return tokens

    def forward(self, h):
        if h.ndim == 3:                                       # (B, T, D) tokens
            if self.conv or self.out_grid is not None:
                raise JobError("a conv or upsampling Projector needs a (B, C, H, W) map, got tokens; "
                               "build Projector(conv=False, out_grid=None) for DiT tokens")
            return self.mlp(h)
        z = self.per_token(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)   # (B, z, H, W)
        if self.out_grid is not None and tuple(z.shape[-2:]) != self.out_grid:
            align = False if self.upsample in ("bilinear", "bicubic") else None
            z = F.interpolate(z, size=self.out_grid, mode=self.upsample, align_corners=align)
        return z.flatten(2).transpose(1, 2)                   # (B, H*W, z), row-major


def unit_fp32(z):
    """z L2-normalised on its last dim in fp32 with autocast off: under fp16 the sum of squares
    overflows (|z| > 256 gives inf, a zero or NaN cosine), REPA issue #46's NaN after 70-160K steps."""
    with torch.autocast(z.device.type, enabled=False):
        return F.normalize(z.float(), dim=-1)


def _encoder_pairs(projected, targets):
    """(projected, target) pairs, one per encoder, checked: single tensors are one encoder."""
    if torch.is_tensor(projected):
        projected, targets = [projected], [targets]
    if len(projected) != len(targets) or not projected:
        raise JobError(f"REPA got {len(projected)} projections for {len(targets)} encoders; "
                       f"pass one projector output per encoder")
    for z_tilde, z in zip(projected, targets):
        if z_tilde.shape != z.shape:
            raise JobError(f"projected features {tuple(z_tilde.shape)} do not match encoder tokens "
                           f"{tuple(z.shape)}; build the projector with the encoder's dim and token grid")
    return list(zip(projected, targets))


def projection_loss(projected, targets):
    """REPA's alignment loss: -cos(h_phi(z), y*) averaged over tokens, then batch and encoders.

    projected, targets: lists (one entry per encoder) of (B, T_k, D_k) tensors (or single tensors).
    Returns (loss scalar, per_sample (B,)) where per_sample[b] = mean over encoders of the
    token-mean of -cos for sample b, and loss = per_sample.mean() (equal to REPA's order).
    Computed in fp32 whatever the autocast (unit_fp32).
    """
    per_encoder = []
    for z_tilde, z in _encoder_pairs(projected, targets):
        cos = (unit_fp32(z_tilde) * unit_fp32(z)).sum(dim=-1)   # (B, T)
        per_encoder.append(-cos.mean(dim=1))                     # (B,)
    per_sample = torch.stack(per_encoder).mean(dim=0)
    return per_sample.mean(), per_sample


def self_similarity(tokens):
    """(B, T, T) cosine similarities of every token pair of each sample, in fp32."""
    unit = unit_fp32(tokens)
    with torch.autocast(unit.device.type, enabled=False):
        return unit @ unit.transpose(1, 2)


def manifold_loss(projected, targets):
    """U-REPA's manifold loss (Eqs. 3-5): per sample, the squared difference of the token-pair cosine
    similarity matrices of the projected features and of the encoder tokens, averaged over all pairs
    (i, j) (the paper leaves the constant open), then over batch and encoders as projection_loss.
    Zero when the two token sets have the same similarity structure, whatever their values.
    Returns (loss scalar, per_sample (B,))."""
    per_encoder = []
    for z_tilde, z in _encoder_pairs(projected, targets):
        per_encoder.append(((self_similarity(z_tilde) - self_similarity(z)) ** 2).mean(dim=(1, 2)))
    per_sample = torch.stack(per_encoder).mean(dim=0)
    return per_sample.mean(), per_sample
