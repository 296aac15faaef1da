# --------------------------------------------------------
# DiT: "Scalable Diffusion Models with Transformers" (Peebles & Xie, ICCV 2023).
# The comparison baseline for DiC. Module names, parameter keys, shapes, initialisation
# and numerics follow the official DiT release, so its checkpoints (e.g. DiT-XL/2 at
# 256px and 512px) load with strict=True and give the same outputs.
# Written without timm: PatchEmbed, Attention and Mlp below keep timm's key names.
# --------------------------------------------------------


import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dic_models
from dic_models import TimestepEmbedder


def modulate(x, shift, scale):
    """adaLN: scale and shift every token of x (N, T, D) by per-sample (N, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                    Transformer Parts (timm key names, no timm)                 #
#################################################################################

class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a conv with kernel = stride = patch size."""
    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        x = self.proj(x)                      # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)   # (N, T, D), tokens in row-major (h, then w) order


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias on), as timm's."""
    def __init__(self, hidden_size, num_heads):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)  # channel order: (q|k|v, head, dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # 3 x (N, heads, T, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)                        # softmax(q k^T / sqrt(head_dim)) v
        x = x.transpose(1, 2).reshape(N, T, D)                             # (N, T, D)
        return self.proj(x)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximate GELU, as DiT configures timm's Mlp."""
    def __init__(self, hidden_size, mlp_hidden_size):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size, bias=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

# The timestep embedder is DiC's (the same module and keys as DiT's). DiC's label embedder also
# returns the labels after dropout, which DiC reuses at every resolution; DiT needs the vectors only.
class LabelEmbedder(dic_models.LabelEmbedder):
    """Class labels to vectors; drops labels to the null row `num_classes` for classifier-free guidance."""

    def forward(self, labels, train, force_drop_ids=None):
        return super().forward(labels, train, force_drop_ids)[0]  # (N, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiTBlock(nn.Module):
    """Transformer block conditioned by adaLN-Zero (shift, scale, gate per branch from c)."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(),
            nn.Linear(hidden_size, 6 * hidden_size, bias=True),
        )

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """Modulated LayerNorm then a Linear to patch_size**2 * out_channels values per token."""
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(),
            nn.Linear(hidden_size, 2 * hidden_size, bias=True),
        )

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x)  # (N, T, p * p * out_channels)


class DiT(dic_models.TapsAndCheckpointing, nn.Module):
    """Diffusion model with a Transformer backbone; defaults are DiT-XL/2 on 256px images (32x32 latents)."""
    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
    ):
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.num_heads = num_heads

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos table: a frozen Parameter (not a buffer) so that it is in the state_dict as in DiT
        # and counted by sum(p.numel() for p in model.parameters()); with it, DiT-XL/2 at 256px has
        # 675,129,632 parameters, the figure DiT's train.py logs (674,834,720 without it).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier Linears, sin-cos pos_embed, N(0, 0.02) embeddings, adaLN-Zero."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Fixed 2-D sin-cos positional embedding (computed in float64 numpy, stored as float32):
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding initialised like a Linear: xavier on the flattened kernel, bias zero (DiT's
        # initialize_weights zeroes it explicitly; a Conv2d is not reached by _basic_init above):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Label table and timestep MLP weights ~ N(0, 0.02):
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity function.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Output layer starts at zero:
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """Tokens (N, T, p * p * C) back to an image (N, C, H, W)."""
        c = self.out_channels
        p = self.patch_size
        h = w = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)                 # (N, C, h, p, w, q)
        return x.reshape(x.shape[0], c, h * p, w * p)          # (N, C, H, W)

    def feature_names(self):
        """Tap names block1..blockN: the tokens after the k-th block (1-based, REPA's --encoder-depth k)."""
        return tuple(f"block{k}" for k in range(1, len(self.blocks) + 1))

    def feature_channels(self, name):
        """Token width D of tap `name` (its tokens are (N, T, D)), to build a projector before any forward."""
        self.wanted_features(name)
        return self.pos_embed.shape[-1]

    def feature_grid(self, name, input_size=None):
        """(h, w) patch grid of tap `name`; its T = h * w tokens are in row-major (h, then w) order."""
        self.wanted_features(name)
        size = (input_size or self.input_size) // self.patch_size
        return (size, size)

    def forward(self, x, t, y, force_drop_ids=None, return_features=None):
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels -> (N, out_channels, H, W);
        force_drop_ids: optional (N,) with 1 where the label is replaced by the null class (DiT's);
        with return_features (names from feature_names(), e.g. ("block8",)): (output, {name: (N, T, D)})."""
        wanted, features = self.wanted_features(return_features), {}
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"input is {tuple(x.shape[-2:])} but this DiT was built for input_size {self.input_size}"
            )
        x = self.x_embedder(x) + self.pos_embed   # (N, T, D), where T = H * W / patch_size ** 2
        t = self.t_embedder(t)                    # (N, D)
        y = self.y_embedder(y, self.training, force_drop_ids)   # (N, D)
        c = t + y                                 # (N, D)
        for k, block in enumerate(self.blocks, start=1):
            x = self.run_block(block, x, c)       # (N, T, D)
            if f"block{k}" in wanted:
                features[f"block{k}"] = x
        x = self.final_layer(x, c)                # (N, T, patch_size ** 2 * out_channels)
        x = self.unpatchify(x)                    # (N, out_channels, H, W)
        return x if return_features is None else (x, features)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=None):
        """Forward with classifier-free guidance, DiT's official 3-channel form by default;
        see dic_models.guided_forward (one implementation for both families)."""
        return dic_models.guided_forward(self, x, t, y, cfg_scale, guide_channels)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# The MAE / DiT layout, kept exactly so that a table rebuilt here equals the one stored in official
# checkpoints: tokens are row-major (row i, column j); the first D/2 channels encode the column j and
# the last D/2 channels the row i; each half is [sin | cos] over D/4 frequencies 1 / 10000^(k / (D/4)).

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed (grid_size**2, embed_dim) float64 table for a square grid of tokens."""
    if embed_dim % 4 != 0:
        raise ValueError(f"sin-cos positional embedding needs hidden_size divisible by 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                             np.arange(grid_size, dtype=np.float32), indexing="ij")  # (G, G) each
    emb_col = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols)  # (G*G, D/2)
    emb_row = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows)  # (G*G, D/2)
    return np.concatenate([emb_col, emb_row], axis=1)                  # (G*G, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """Positions pos (any shape, M values) -> (M, embed_dim) table [sin | cos]."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega                          # (D/2,)
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


#################################################################################
#                                   DiT Configs                                  #
#################################################################################

def DiT_XL_2(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)

def DiT_XL_4(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)

def DiT_XL_8(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)

def DiT_L_2(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)

def DiT_L_4(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)

def DiT_L_8(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)

def DiT_B_2(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)

def DiT_B_4(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)

def DiT_B_8(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)

def DiT_S_2(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)

def DiT_S_4(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)

def DiT_S_8(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2,   "DiT-L/4": DiT_L_4,   "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2,   "DiT-B/4": DiT_B_4,   "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2,   "DiT-S/4": DiT_S_4,   "DiT-S/8": DiT_S_8,
}
