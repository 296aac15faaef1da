"""Forward GMACs of a model, counted on the meta device, and the papers' numbers to check them
against. Part of bench/bench.py (which puts the repository root and this folder on sys.path).
"""
import torch

from helpers.utils.models import create_model

# GMACs at 256px (32x32 latents): DiC paper / shared/spec/DIC.md; DiT paper Table 1 ("Gflops")
# and DiCo's README ("FLOPs" column: torchprofile MACs, which count a little more than the
# convolutions and Linears counted here; shared/spec/DICO.md; DiCo-H is not in it).
SPEC_GMACS_256 = {"DiC-S": 5.87, "DiC-B": 23.44, "DiC-XL": 116.10, "DiC-H": 204.32,
                  "DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.71, "DiT-XL/2": 118.64,
                  "DiCo-S": 4.25, "DiCo-B": 16.88, "DiCo-L": 60.24, "DiCo-XL": 87.30}
# DiCo counted as here, convolutions and Linears only (shared/spec/DICO.md)
SPEC_DICO_CONV_LINEAR_GMACS_256 = {"DiCo-S": 4.24, "DiCo-B": 16.86, "DiCo-L": 60.17, "DiCo-XL": 87.22,
                                   "DiCo-H": 194.0}


def count_gmacs(name, latent_size, in_channels=4):
    """Forward GMACs at batch 1 (meta device: no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = create_model(name, input_size=latent_size, in_channels=in_channels).eval()
        x = torch.randn(1, in_channels, latent_size, latent_size)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y)
    params = sum(p.numel() for p in model.parameters())
    return counter.get_total_flops() / 2e9, params
