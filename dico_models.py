# DiCo: Diffusion ConvNets with compact channel attention (Ai et al., "DiCo: Revitalizing
# ConvNets for Scalable and Efficient Diffusion Modeling", NeurIPS 2025, arXiv 2505.11196).
#
# A U-shaped ConvNet over 3 resolutions (Restormer-like): each block is a DiT-style adaLN
# block whose token mixer is Conv1x1 -> depthwise Conv3x3 -> GELU -> compact channel
# attention -> Conv1x1, and whose MLP is a pair of Conv1x1. Conditioned per resolution level
# on timestep + class. Module and parameter names match the official implementation, so
# official checkpoints load with load_state_dict(strict=True). Defaults reproduce the paper.
# Facts: the DiCo paper and its official code (github shallowdream204/DiCo).
# --------------------------------------------------------
# References:
# DiT:  https://github.com/facebookresearch/DiT (embedders, adaLN, final layer, CFG)
# DiC:  dic_models.py (shared embedders, resampling, taps, checkpointing, guidance)
# --------------------------------------------------------

import torch
import torch.nn as nn
import torch.nn.functional as F

from dic_models import (ChannelLayerNorm, Downsample, PatchEmbed, TapsAndCheckpointing, TimestepEmbedder,
                        Upsample, check_inputs, drop_labels, guided_forward, modulate)


#################################################################################
#                     Class Labels: one table per resolution level              #
#################################################################################

class LabelEmbedder(nn.Module):
    """Maps class labels to one vector per level (tables `embedding_table_0/1/2`); row num_classes is the null class."""

    def __init__(self, num_classes, widths, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        for level, w in enumerate(widths):
            setattr(self, f"embedding_table_{level}", nn.Embedding(num_classes + use_cfg_embedding, w))
        self.levels = len(widths)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def tables(self):
        return [getattr(self, f"embedding_table_{level}") for level in range(self.levels)]

    def token_drop(self, labels, force_drop_ids=None):
        """Replace a random fraction (or the forced ones) of labels by the null class, once per sample."""
        return drop_labels(labels, self.num_classes, self.dropout_prob, force_drop_ids)

    def forward(self, labels, train, force_drop_ids=None):
        """Returns ([embeddings (N, w_l) per level], labels after dropout (N,)); one draw for all tables."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return [table(labels) for table in self.tables()], labels


#################################################################################
#                                 Core DiCo Layers                              #
#################################################################################

class DiCoBlock(nn.Module):
    """The DiCo block: adaLN-modulated conv mixer with compact channel attention, then a gated Conv1x1 MLP."""

    def __init__(self, width, mlp_ratio=2.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = ChannelLayerNorm(width, eps=1e-6)
        self.conv1 = nn.Conv2d(width, width, kernel_size=1, bias=True)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width, bias=True)  # depthwise
        self.conv3 = nn.Conv2d(width, width, kernel_size=1, bias=True)
        self.ca = nn.Sequential(                                   # compact channel attention
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(width, width, kernel_size=1, bias=True),
            nn.Sigmoid(),
        )
        self.norm2 = ChannelLayerNorm(width, eps=1e-6)
        self.conv4 = nn.Conv2d(width, hidden, kernel_size=1, bias=True)
        self.conv5 = nn.Conv2d(hidden, width, kernel_size=1, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width, bias=True))

    def forward(self, x, c):
        # x: (N, W, H, W'); c: (N, W)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).to(x.dtype).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift1, scale1)
        h = F.gelu(self.conv2(self.conv1(h)))                      # no activation between conv1 and conv2
        h = h * self.ca(h)                                         # (N, W, 1, 1) channel weights
        x = torch.addcmul(x, gate1[:, :, None, None], self.conv3(h))
        h = self.conv5(F.gelu(self.conv4(modulate(self.norm2(x), shift2, scale2))))
        return torch.addcmul(x, gate2[:, :, None, None], h)


class FinalLayer(nn.Module):
    """Output head: channel LayerNorm, adaLN shift/scale, Conv3x3 to the output channels (key order: out_proj, adaLN)."""

    def __init__(self, hidden_size, out_channels):
        super().__init__()
        self.norm_final = ChannelLayerNorm(hidden_size, eps=1e-6)
        self.out_proj = nn.Conv2d(hidden_size, out_channels, kernel_size=3, padding=1, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).to(x.dtype).chunk(2, dim=1)  # (N, W) each
        return self.out_proj(modulate(self.norm_final(x), shift, scale))      # (N, out, H, W)


#################################################################################
#                                   DiCo Model                                  #
#################################################################################

STAGES = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")
TAPS = ("enc0", "enc1", "mid", "dec1", "dec0")     # feature-tap name of each stage (as DiC's)
STAGE_MULT = (1, 2, 4, 2, 2)                       # stage widths in units of C: dec1 stays at 2C
STAGE_LEVEL = (0, 1, 2, 1, 0)                      # resolution level of each stage
STAGE_COND = (0, 1, 2, 1, 1)                       # condition of each stage: c1, c2, c3, c2, c2


class DiCo(TapsAndCheckpointing, nn.Module):
    """DiCo: a conditioned U-shaped ConvNet of DiCo blocks that predicts eps (and sigma)."""

    def __init__(
        self,
        input_size=32,
        in_channels=4,
        hidden_size=128,
        depth=(5, 4, 4, 4, 4),
        mlp_ratio=2.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
    ):
        super().__init__()
        depth = tuple(int(d) for d in depth)
        if len(depth) != 5 or min(depth) < 1:
            raise ValueError(f"depth {depth} must list 5 stages (enc1, enc2, latent, dec2, dec1) of >= 1 block, "
                             f"e.g. (5, 4, 4, 4, 4)")
        if hidden_size % 2:
            raise ValueError(f"hidden_size {hidden_size} must be even (the first downsample convolves to C/2)")
        self.input_size = input_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.hidden_size = hidden_size
        self.depth = depth
        self.mlp_ratio = mlp_ratio
        self.levels = 3
        self.downsample_factor = 4
        C = hidden_size
        self.widths = [C, 2 * C, 4 * C]                          # condition widths c1, c2, c3
        self.stage_widths = [C * m for m in STAGE_MULT]          # C, 2C, 4C, 2C, 2C

        # registration order = the official key order
        self.x_embedder = PatchEmbed(in_channels, C)
        self.t_embedder_1 = TimestepEmbedder(C)
        self.y_embedder = LabelEmbedder(num_classes, self.widths, class_dropout_prob)
        self.t_embedder_2 = TimestepEmbedder(2 * C)
        self.t_embedder_3 = TimestepEmbedder(4 * C)

        def stage(i):
            return nn.ModuleList([DiCoBlock(self.stage_widths[i], mlp_ratio) for _ in range(depth[i])])
        self.encoder_level_1 = stage(0)
        self.down1_2 = Downsample(C, 2 * C)                      # Conv3x3 C -> C/2, unshuffle -> 2C
        self.encoder_level_2 = stage(1)
        self.down2_3 = Downsample(2 * C, 4 * C)                  # Conv3x3 2C -> C, unshuffle -> 4C
        self.latent = stage(2)
        self.up3_2 = Upsample(4 * C, 2 * C)                      # Conv3x3 4C -> 8C, shuffle -> 2C
        self.reduce_chan_level2 = nn.Conv2d(4 * C, 2 * C, kernel_size=1, bias=True)
        self.decoder_level_2 = stage(3)
        self.up2_1 = Upsample(2 * C, C)                          # Conv3x3 2C -> 4C, shuffle -> C
        self.reduce_chan_level1 = nn.Conv2d(2 * C, 2 * C, kernel_size=1, bias=True)
        self.decoder_level_1 = stage(4)
        self.final_layer = FinalLayer(2 * C, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Official initialisation: xavier convs/linears, embedders N(0, 0.02), every adaLN and the output zero."""
        def _basic_init(module):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)      # depthwise (W, 1, 3, 3): fans 9 and 9W
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Like nn.Linear (not nn.Conv2d): xavier on the (C, in*3*3) view
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        for table in self.y_embedder.tables():
            nn.init.normal_(table.weight, std=0.02)
        for t_embedder in (self.t_embedder_1, self.t_embedder_2, self.t_embedder_3):
            nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)

        # Unlike DiC's, DiCo's zeroing reaches every block's adaLN
        for name in STAGES:
            for block in getattr(self, name):
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.out_proj.weight, 0)
        nn.init.constant_(self.final_layer.out_proj.bias, 0)

    def feature_names(self):
        """Tap names, one per stage in forward order (a stage's output, before down/upsampling), as DiC's."""
        return TAPS

    def feature_channels(self, name):
        """Channels of tap `name` (its map is (N, C, H, W)): C, 2C, 4C, 2C, 2C."""
        self.wanted_features(name)
        return self.stage_widths[TAPS.index(name)]

    def feature_grid(self, name, input_size=None):
        """(H, W) of tap `name` for square inputs of input_size (default: the model's input_size)."""
        self.wanted_features(name)
        size = (input_size or self.input_size) // 2 ** STAGE_LEVEL[TAPS.index(name)]
        return (size, size)

    def _check_inputs(self, x, t, y):
        check_inputs(x, t, y, self.in_channels, 4, "DiCo downsamples twice")

    def _stage(self, i, x, conds, wanted, features):
        for block in getattr(self, STAGES[i]):
            x = self.run_block(block, x, conds[STAGE_COND[i]])  # (N, w_i, H/2^l, W/2^l)
        if TAPS[i] in wanted:
            features[TAPS[i]] = x
        return x

    def forward(self, x, t, y, force_drop_ids=None, return_features=None):
        """
        Forward pass of DiCo.
        x: (N, C, H, W) latents (H, W divisible by 4); t: (N,) timesteps; y: (N,) class labels
        force_drop_ids: optional (N,) with 1 where the label is replaced by the null class.
        return_features: optional tap names (see feature_names()), e.g. ("enc1",).
        Returns (N, out_channels, H, W); with return_features, (output, {name: (N, C, h, w)}).
        """
        self._check_inputs(x, t, y)
        wanted, features = self.wanted_features(return_features), {}
        if force_drop_ids is not None and self.class_dropout_prob <= 0:
            raise ValueError("force_drop_ids needs a null-class row; build the model with class_dropout_prob > 0")
        x = self.x_embedder(x)                                   # (N, C, H, W)
        y_embs, _ = self.y_embedder(y, self.training, force_drop_ids)
        t_embs = [self.t_embedder_1(t), self.t_embedder_2(t), self.t_embedder_3(t)]
        conds = [te + ye for te, ye in zip(t_embs, y_embs)]      # c1 (N, C), c2 (N, 2C), c3 (N, 4C)

        enc1 = self._stage(0, x, conds, wanted, features)        # (N, C, H, W)
        enc2 = self._stage(1, self.down1_2(enc1), conds, wanted, features)   # (N, 2C, H/2, W/2)
        x = self._stage(2, self.down2_3(enc2), conds, wanted, features)      # (N, 4C, H/4, W/4)
        x = self.reduce_chan_level2(torch.cat([self.up3_2(x), enc2], dim=1))  # (N, 2C, H/2, W/2)
        x = self._stage(3, x, conds, wanted, features)
        x = self.reduce_chan_level1(torch.cat([self.up2_1(x), enc1], dim=1))  # (N, 2C, H, W)
        x = self._stage(4, x, conds, wanted, features)
        x = self.final_layer(x, conds[1])                        # (N, out_channels, H, W)
        return x if return_features is None else (x, features)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels="official"):
        """Classifier-free guidance as DiT's; "official" guides the first 3 channels, "all" (or an int) more.
        See dic_models.guided_forward."""
        return guided_forward(self, x, t, y, cfg_scale, None if guide_channels == "official" else guide_channels)


#################################################################################
#                                  DiCo Configs                                 #
#################################################################################

def DiCo_S(**kwargs):
    """DiCo-S (paper): base width 128, depths (5, 4, 4, 4, 4), MLP ratio 2, 33.1 M parameters."""
    return DiCo(**{"hidden_size": 128, "depth": (5, 4, 4, 4, 4), "mlp_ratio": 2, **kwargs})

def DiCo_B(**kwargs):
    """DiCo-B (paper): base width 256, depths (5, 4, 4, 4, 4), MLP ratio 2, 130.0 M parameters."""
    return DiCo(**{"hidden_size": 256, "depth": (5, 4, 4, 4, 4), "mlp_ratio": 2, **kwargs})

def DiCo_L(**kwargs):
    """DiCo-L (paper): base width 352, depths (9, 8, 9, 8, 9), MLP ratio 2, 463.9 M parameters."""
    return DiCo(**{"hidden_size": 352, "depth": (9, 8, 9, 8, 9), "mlp_ratio": 2, **kwargs})

def DiCo_XL(**kwargs):
    """DiCo-XL (paper): base width 416, depths (9, 9, 10, 9, 9), MLP ratio 2, 701.2 M parameters."""
    return DiCo(**{"hidden_size": 416, "depth": (9, 9, 10, 9, 9), "mlp_ratio": 2, **kwargs})

def DiCo_H(**kwargs):
    """DiCo-H (paper): base width 416, depths (14, 12, 10, 12, 14), MLP ratio 4, 1037.4 M parameters."""
    return DiCo(**{"hidden_size": 416, "depth": (14, 12, 10, 12, 14), "mlp_ratio": 4, **kwargs})

def DiCo_Tiny(**kwargs):
    """DiCo-Tiny, NOT from the paper: a ~1.3 M parameter DiCo for CPU tests and quick starts."""
    # Base width 32, depths (2, 2, 2, 2, 2), MLP ratio 2: the paper's stage layout (C, 2C, 4C, 2C, 2C),
    # block, skips and conditioning, just narrow and shallow.
    return DiCo(**{"hidden_size": 32, "depth": (2, 2, 2, 2, 2), "mlp_ratio": 2, **kwargs})


DiCo_models = {
    "DiCo-S": DiCo_S, "DiCo-B": DiCo_B, "DiCo-L": DiCo_L, "DiCo-XL": DiCo_XL, "DiCo-H": DiCo_H,
    "DiCo-Tiny": DiCo_Tiny,
}
