# DiC: Diffusion ConvNets (Tian et al., "DiC: Rethinking Conv3x3 Designs in Diffusion
# Models", CVPR 2025, arXiv 2501.00603).
#
# A U-shaped ConvNet of plain Conv3x3 residual blocks over 3 resolutions, conditioned
# per resolution level on timestep + class (adaLN-style scale/shift plus a gate).
# Module and parameter names match the official implementation, so official
# checkpoints load with load_state_dict(strict=True). Defaults reproduce the paper.
# --------------------------------------------------------
# References:
# DiT:  https://github.com/facebookresearch/DiT (embedders, final layer, CFG)
# EDM:  https://github.com/NVlabs/edm (UNetBlock layout, GroupNorm group rule)
# --------------------------------------------------------

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def modulate(x, shift, scale):
    # x: (N, C, H, W); shift, scale: (N, C) -> broadcast over H, W
    return torch.addcmul(shift[:, :, None, None], x, 1 + scale[:, :, None, None])


def group_count(channels, max_groups=32, min_channels_per_group=4):
    """Number of GroupNorm groups: the official rule min(32, channels // 4)."""
    groups = min(max_groups, channels // min_channels_per_group)
    if groups < 1 or channels % groups != 0:
        raise ValueError(
            f"GroupNorm over {channels} channels: min({max_groups}, {channels} // "
            f"{min_channels_per_group}) = {groups} groups does not divide the channels; "
            f"use a base width (hidden_size) that is a multiple of 8 (at least 32 for widths >= 128)"
        )
    return groups


#################################################################################
#              Gradient checkpointing and feature taps (DiC and DiT)            #
#################################################################################

def check_inputs(x, t, y, in_channels, factor, downsampling):
    """One clear ValueError for inputs a U-shaped ConvNet cannot take: the layout, the channel count,
    a side not divisible by `factor` (`downsampling` says why, e.g. "DiC downsamples 2 times"), t and y
    not one entry per sample."""
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"x has {x.shape[1]} channels but the model was built with in_channels={in_channels}; "
            f"build it with in_channels={x.shape[1]} or pass matching latents"
        )
    H, W = x.shape[-2:]
    if H % factor or W % factor:
        raise ValueError(
            f"input size {H}x{W} is not divisible by {factor} ({downsampling}); "
            f"use an image/latent size that is a multiple of {factor}"
        )
    if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
        raise ValueError(
            f"t and y must be 1-D with one entry per sample ({x.shape[0]}), got t {tuple(t.shape)}, y {tuple(y.shape)}"
        )


class TapsAndCheckpointing:
    """Mixin for DiC and DiT: per-block gradient checkpointing and named intermediate features (REPA).

    A model using it sets `grad_checkpointing = False` and defines `feature_names()`,
    `feature_channels(name)` and `feature_grid(name)`; its forward calls `run_block` and `wanted_features`.
    """

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        """Recompute each block's activations in backward instead of storing them (less memory while training)."""
        self.grad_checkpointing = bool(enable)
        return self

    def run_block(self, block, *args):
        """block(*args), checkpointed (RNG state preserved, so dropout repeats) when training with it on."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def wanted_features(self, return_features):
        """The requested tap names as a set (a single name is allowed); unknown names fail with the list."""
        if return_features is None:
            return frozenset()
        names = (return_features,) if isinstance(return_features, str) else tuple(return_features)
        known = self.feature_names()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{type(self).__name__} has no feature tap {unknown}; "
                             f"choose from {', '.join(known)}")
        return frozenset(names)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Maps scalar timesteps to a vector: sinusoidal features, then a 2-layer MLP (as in DiT)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) timesteps (may be fractional) -> (N, dim) features [cos, sin]."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]                            # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))              # (N, D)


def drop_labels(labels, num_classes, dropout_prob, force_drop_ids=None):
    """Labels with a random fraction (or the forced ones: force_drop_ids == 1) replaced by the null
    class `num_classes`, one draw per sample (DiT's token_drop)."""
    if force_drop_ids is None:
        drop_ids = torch.rand(labels.shape[0], device=labels.device) < dropout_prob
    else:
        drop_ids = force_drop_ids == 1
    return torch.where(drop_ids, torch.full_like(labels, num_classes), labels)


class LabelEmbedder(nn.Module):
    """Maps class labels to vectors; row `num_classes` is the null class used by CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace a random fraction (or the forced ones) of labels by the null class."""
        return drop_labels(labels, self.num_classes, self.dropout_prob, force_drop_ids)

    def forward(self, labels, train, force_drop_ids=None):
        """Returns (embeddings (N, D), labels after dropout (N,))."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels), labels


#################################################################################
#                                 Core DiC Layers                               #
#################################################################################

class PatchEmbed(nn.Module):
    """Lifts the input latent to the base width with one Conv3x3 (no patchifying)."""

    def __init__(self, in_channels, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=3, padding=1, bias=True)

    def forward(self, x):
        return self.proj(x)  # (N, in, H, W) -> (N, C, H, W)


class Downsample(nn.Module):
    """Halves the resolution without losing values: Conv3x3 to out/4 channels, then PixelUnshuffle."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels // 4, kernel_size=3, padding=1, bias=False),
            nn.PixelUnshuffle(2),
        )

    def forward(self, x):
        return self.body(x)  # (N, in, H, W) -> (N, out, H/2, W/2)


class Upsample(nn.Module):
    """Doubles the resolution: Conv3x3 to 4*out channels, then PixelShuffle."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels * 4, kernel_size=3, padding=1, bias=False),
            nn.PixelShuffle(2),
        )

    def forward(self, x):
        return self.body(x)  # (N, in, H, W) -> (N, out, 2H, 2W)


class ConvBlock(nn.Module):
    """The DiC residual block: two Conv3x3 with a conditioned, gated GroupNorm modulation between them."""

    def __init__(self, in_channels, out_channels, emb_channels, gating=True, dropout=0.0,
                 max_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.gating = gating
        self.dropout = dropout
        self.norm0 = nn.GroupNorm(group_count(in_channels, max_groups, min_channels_per_group), in_channels, eps=eps)
        self.conv0 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        # (gate, scale, shift) with gating, (scale, shift) without
        self.affine = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, out_channels * (3 if gating else 2), bias=True),
        )
        self.norm1 = nn.GroupNorm(group_count(out_channels, max_groups, min_channels_per_group), out_channels, eps=eps)
        self.conv1 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True) if in_channels != out_channels else None

    def forward(self, x, c):
        # x: (N, in, H, W); c: (N, emb)
        h = self.conv0(F.gelu(self.norm0(x)))                    # (N, out, H, W)
        params = self.affine(c)[:, :, None, None].to(h.dtype)    # (N, k*out, 1, 1)
        if self.gating:
            gate, scale, shift = params.chunk(3, dim=1)
        else:
            scale, shift = params.chunk(2, dim=1)
            gate = None
        h = F.gelu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        residual = x if self.skip is None else self.skip(x)      # (N, out, H, W)
        if gate is None:
            return residual + h
        return torch.addcmul(residual, gate, h)


class DiCBlock(nn.Module):
    """One stage entry; the wrapper exists so parameter names match the official `<stage>.<i>.conv.*`."""

    def __init__(self, in_channels, out_channels, **block_kwargs):
        super().__init__()
        self.conv = ConvBlock(in_channels, out_channels, emb_channels=out_channels, **block_kwargs)

    def forward(self, x, c):
        return self.conv(x, c)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of an NCHW tensor (no affine), as the official final layer."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.channels = channels
        self.eps = eps

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)                                # (N, H, W, C)
        x = F.layer_norm(x, (self.channels,), eps=self.eps)
        return x.permute(0, 3, 1, 2)                             # (N, C, H, W)


class FinalLayer(nn.Module):
    """Output head: channel LayerNorm, adaLN shift/scale from c0, Conv3x3 to the output channels."""

    def __init__(self, hidden_size, out_channels):
        super().__init__()
        self.norm_final = ChannelLayerNorm(hidden_size, eps=1e-6)
        self.out_proj = nn.Conv2d(hidden_size, out_channels, kernel_size=3, padding=1, bias=True)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(),
            nn.Linear(hidden_size, 2 * hidden_size, bias=True),
        )

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).to(x.dtype).chunk(2, dim=1)  # (N, C) each
        x = modulate(self.norm_final(x), shift, scale)
        return self.out_proj(x)                                              # (N, out, H, W)


#################################################################################
#                                   DiC Model                                   #
#################################################################################

class DiC(TapsAndCheckpointing, nn.Module):
    """Diffusion ConvNet: a conditioned U-shaped Conv3x3 network that predicts eps (and sigma)."""

    def __init__(
        self,
        input_size=32,
        in_channels=4,
        hidden_size=96,
        depth=(6, 6, 5, 6, 6),
        mult_channels=(1, 2, 4, 2, 1),
        skip_stride=3,
        gating=True,
        dropout=0.0,
        zero_init_block_modulation=False,
        max_groups=32,
        min_channels_per_group=4,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
    ):
        super().__init__()
        depth, mult_channels = tuple(int(d) for d in depth), tuple(int(m) for m in mult_channels)
        if len(mult_channels) * 2 - 1 == len(depth):         # short form (1, 2, 4) -> (1, 2, 4, 2, 1)
            mult_channels = mult_channels + mult_channels[-2::-1]
        if len(depth) < 3 or len(depth) % 2 == 0 or len(mult_channels) != len(depth):
            raise ValueError(
                f"depth {depth} and mult_channels {mult_channels} must both list (enc..., mid, ...dec) "
                f"stages, an odd count >= 3, e.g. depth=(6, 6, 5, 6, 6), mult_channels=(1, 2, 4, 2, 1)"
            )
        if mult_channels != mult_channels[::-1]:
            raise ValueError(f"mult_channels {mult_channels} must be mirrored (decoder widths = encoder widths)")
        if skip_stride < 1:
            raise ValueError(f"skip_stride must be >= 1, got {skip_stride}")
        self.levels = (len(depth) + 1) // 2                  # 3 resolution levels in the paper
        L = self.levels
        for level in range(L - 1):                           # every pushed skip must be popped
            n_enc, n_dec = depth[level], depth[-1 - level]
            if -(-n_enc // skip_stride) != -(-n_dec // skip_stride):
                raise ValueError(
                    f"level {level}: encoder stage of {n_enc} blocks pushes {-(-n_enc // skip_stride)} skips but the "
                    f"decoder stage of {n_dec} blocks pops {-(-n_dec // skip_stride)} (skip_stride={skip_stride}); "
                    f"use mirrored depths"
                )

        self.input_size = input_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.hidden_size = hidden_size
        self.depth = depth
        self.mult_channels = mult_channels
        self.skip_stride = skip_stride
        self.gating = gating
        self.zero_init_block_modulation = zero_init_block_modulation
        self.downsample_factor = 2 ** (L - 1)

        widths = [hidden_size * m for m in mult_channels[:L]]  # w_l per level: C, 2C, 4C
        self.widths = widths
        block_kwargs = dict(gating=gating, dropout=dropout, max_groups=max_groups,
                            min_channels_per_group=min_channels_per_group)

        self.x_embedder = PatchEmbed(in_channels, widths[0])
        self.t_embedder_ls = nn.ModuleList([TimestepEmbedder(w) for w in widths])
        self.y_embedder_ls = nn.ModuleList([LabelEmbedder(num_classes, w, class_dropout_prob) for w in widths])
        self.enc_blocks = nn.ModuleList()
        self.lat_blocks = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()

        # encoder: level l at width w_l, then down to w_{l+1} at half resolution
        for level in range(L - 1):
            w = widths[level]
            self.enc_blocks.append(nn.ModuleList([DiCBlock(w, w, **block_kwargs) for _ in range(depth[level])]))
            self.downs.append(Downsample(w, widths[level + 1]))
        # middle: the lowest resolution
        w = widths[L - 1]
        self.lat_blocks.append(nn.ModuleList([DiCBlock(w, w, **block_kwargs) for _ in range(depth[L - 1])]))
        # decoder: up to level l, then blocks; every skip_stride-th block takes concat([x, skip])
        for k, level in enumerate(reversed(range(L - 1))):
            w = widths[level]
            self.ups.append(Upsample(widths[level + 1], w))
            self.dec_blocks.append(nn.ModuleList([
                DiCBlock(2 * w if i % skip_stride == 0 else w, w, **block_kwargs)
                for i in range(depth[L + k])
            ]))

        self.output = nn.Conv2d(widths[0], widths[0], kernel_size=3, padding=1, bias=True)
        self.final_layer = FinalLayer(widths[0], self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Official initialisation (xavier everywhere, embedder N(0, 0.02), zero output head)."""
        def _basic_init(module):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Like nn.Linear (not nn.Conv2d): xavier on the (out, in*3*3) view
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        for y_embedder in self.y_embedder_ls:
            nn.init.normal_(y_embedder.embedding_table.weight, std=0.02)
        for t_embedder in self.t_embedder_ls:
            nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)

        # The official code intends to zero the blocks' modulation but misses it (they stay
        # xavier); the default False reproduces what the published models trained from.
        if self.zero_init_block_modulation:
            for stages in (self.enc_blocks, self.lat_blocks, self.dec_blocks):
                for stage in stages:
                    for block in stage:
                        nn.init.constant_(block.conv.affine[-1].weight, 0)
                        nn.init.constant_(block.conv.affine[-1].bias, 0)

        # Zero-out the output head so the model starts by predicting 0
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.out_proj.weight, 0)
        nn.init.constant_(self.final_layer.out_proj.bias, 0)

    def feature_names(self):
        """Tap names, one per stage in forward order: enc0.., mid, ..dec0 (a stage's output, before down/upsampling)."""
        L = self.levels
        return tuple([f"enc{l}" for l in range(L - 1)] + ["mid"] + [f"dec{l}" for l in reversed(range(L - 1))])

    def _feature_level(self, name):
        """Resolution level of a tap (0 = input resolution), so its width and grid follow."""
        self.wanted_features(name)
        return self.levels - 1 if name == "mid" else int(name[3:])

    def feature_channels(self, name):
        """Channels C of tap `name` (its map is (N, C, H, W)), to build a projector before any forward."""
        return self.widths[self._feature_level(name)]

    def feature_grid(self, name, input_size=None):
        """(H, W) of tap `name` for square inputs of input_size (default: the model's input_size)."""
        size = (input_size or self.input_size) // 2 ** self._feature_level(name)
        return (size, size)

    def _check_inputs(self, x, t, y):
        check_inputs(x, t, y, self.in_channels, self.downsample_factor,
                     f"DiC downsamples {self.levels - 1} times")

    def forward(self, x, t, y, force_drop_ids=None, return_features=None):
        """
        Forward pass of DiC.
        x: (N, C, H, W) latents (H, W divisible by 4); t: (N,) timesteps; y: (N,) class labels
        force_drop_ids: optional (N,) with 1 where the label is replaced by the null class.
        return_features: optional tap names (see feature_names()), e.g. ("enc1",).
        Returns (N, out_channels, H, W); with return_features, (output, {name: (N, C, h, w)}).
        """
        self._check_inputs(x, t, y)
        wanted, features = self.wanted_features(return_features), {}
        if force_drop_ids is not None and self.class_dropout_prob <= 0:
            raise ValueError("force_drop_ids needs a null-class row; build the model with class_dropout_prob > 0")
        L = self.levels
        x = self.x_embedder(x)                                   # (N, C, H, W)

        # one condition per level; labels are dropped once (level 0) and reused at every level
        conds = []
        for level in range(L):
            t_emb = self.t_embedder_ls[level](t)                 # (N, w_l)
            if level == 0:
                y_emb, y = self.y_embedder_ls[0](y, self.training, force_drop_ids)
            else:
                y_emb, _ = self.y_embedder_ls[level](y, False)
            conds.append(t_emb + y_emb)                          # c_l: (N, w_l)

        skips = []
        for level, stage in enumerate(self.enc_blocks):
            for i, block in enumerate(stage):
                x = self.run_block(block, x, conds[level])       # (N, w_l, H/2^l, W/2^l)
                if (len(stage) - 1 - i) % self.skip_stride == 0:
                    skips.append(x)
            if f"enc{level}" in wanted:
                features[f"enc{level}"] = x
            x = self.downs[level](x)                             # (N, w_{l+1}, H/2^{l+1}, W/2^{l+1})

        for stage in self.lat_blocks:
            for block in stage:
                x = self.run_block(block, x, conds[L - 1])       # (N, w_{L-1}, H/2^{L-1}, W/2^{L-1})
        if "mid" in wanted:
            features["mid"] = x

        for k, stage in enumerate(self.dec_blocks):
            level = L - 2 - k
            x = self.ups[k](x)                                   # (N, w_l, H/2^l, W/2^l)
            for i, block in enumerate(stage):
                if i % self.skip_stride == 0:
                    x = torch.cat([x, skips.pop()], dim=1)       # (N, 2*w_l, H/2^l, W/2^l)
                x = self.run_block(block, x, conds[level])       # (N, w_l, H/2^l, W/2^l)
            if f"dec{level}" in wanted:
                features[f"dec{level}"] = x

        x = self.output(x)                                       # (N, C, H, W)
        x = self.final_layer(x, conds[0])                        # (N, out_channels, H, W)
        return x if return_features is None else (x, features)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=None):
        """Forward with classifier-free guidance; see `guided_forward`."""
        return guided_forward(self, x, t, y, cfg_scale, guide_channels)


def guided_forward(model, x, t, y, cfg_scale, guide_channels=None):
    """
    Classifier-free guidance as DiT/DiC's forward_with_cfg (shared by dit_models). The batch is
    [conditional half; same latents with the null label]; only the first half of x is used.
    guide_channels: None = official (first min(3, in_channels) channels, as DiT/DiC do "for exact
    reproducibility"); an int or "all" = that many / every latent channel. Channels that are not
    guided (and the variance channels) pass through from the model output.
    """
    in_channels = model.in_channels
    if model.class_dropout_prob <= 0:
        raise ValueError("classifier-free guidance needs a null-label row: build the model with "
                         "class_dropout_prob > 0")
    if guide_channels is None:
        guide_channels = min(3, in_channels)
    elif guide_channels == "all":
        guide_channels = in_channels
    elif isinstance(guide_channels, bool) or not isinstance(guide_channels, int) \
            or not 1 <= guide_channels <= in_channels:
        raise ValueError(f"guide_channels must be None, 'all' or an int in 1..{in_channels}, "
                         f"got {guide_channels!r}")
    if x.shape[0] % 2:
        raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond], got {x.shape[0]} rows")
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model.forward(combined, t, y)                # (N, out_channels, H, W)
    eps, rest = model_out[:, :guide_channels], model_out[:, guide_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


#################################################################################
#                                  DiC Configs                                  #
#################################################################################

def DiC_S(**kwargs):
    """DiC-S (paper): base width 96, depths (6, 6, 5, 6, 6), 32.8 M parameters."""
    return DiC(**{"hidden_size": 96, "depth": (6, 6, 5, 6, 6), **kwargs})

def DiC_B(**kwargs):
    """DiC-B (paper): base width 192, depths (6, 6, 5, 6, 6), 129.5 M parameters."""
    return DiC(**{"hidden_size": 192, "depth": (6, 6, 5, 6, 6), **kwargs})

def DiC_XL(**kwargs):
    """DiC-XL (paper): base width 384, depths (7, 7, 8, 7, 7), 702.3 M parameters."""
    return DiC(**{"hidden_size": 384, "depth": (7, 7, 8, 7, 7), **kwargs})

def DiC_H(**kwargs):
    """DiC-H (paper): base width 384, depths (14, 14, 10, 14, 14), 1034.5 M parameters."""
    return DiC(**{"hidden_size": 384, "depth": (14, 14, 10, 14, 14), **kwargs})

def DiC_Tiny(**kwargs):
    """DiC-Tiny, NOT from the paper: a ~1 M parameter DiC for CPU tests and quick starts."""
    # Base width 32, depths (2, 2, 2, 2, 2); widths (32, 64, 64) instead of the paper's
    # (1, 2, 4) multipliers keep it near 1 M parameters (0.97 M at 10 classes, 1.12 M at
    # 1000; with (1, 2, 4) it would be 1.67 M / 1.89 M). Same block, skips and conditioning.
    return DiC(**{"hidden_size": 32, "depth": (2, 2, 2, 2, 2), "mult_channels": (1, 2, 2, 2, 1), **kwargs})


DiC_models = {
    "DiC-S": DiC_S, "DiC-B": DiC_B, "DiC-XL": DiC_XL, "DiC-H": DiC_H,
    "DiC-Tiny": DiC_Tiny,
}
