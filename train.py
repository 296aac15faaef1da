"""
Train DiC (or DiT) with PyTorch DDP: the official recipe (AdamW lr 1e-4, no weight decay, global
batch 256, EMA 0.9999, class dropout 0.1, 1000-step linear diffusion with learned sigma, TF32) on
class folders (VAE-encoded on the fly), precomputed latents, or a built-in pixel-space dataset.

    torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiC-XL --data-path /path/to/imagenet/train
    torchrun --nproc_per_node=8 train.py --model DiC-XL --feature-path /path/to/features
    python train.py --model DiC-Tiny --dataset digits --global-batch-size 64 --max-steps 2000
    torchrun --nproc_per_node=8 train.py --model DiC-XL --data-path ... --resume auto
    torchrun --nproc_per_node=8 train.py --model DiC-XL --feature-path ... --precision bf16 --compile

Fast path (helpers/fastpath.py): fused AdamW and a foreach EMA update are on (same numbers up to
float rounding); --precision bf16, --compile and --channels-last on are opt-in.

Runs never get lost: see helpers/training.py (atomic checkpoints, exact resume, NaN stop).
"""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers import fastpath, training
from helpers.distributed import cleanup_distributed, is_distributed, setup_distributed
from helpers.log import RunLogger


def main(args):
    """Train a model; returns the process exit code (0, or non-zero after a one-line error)."""
    dist_info = setup_distributed()
    log = RunLogger(dist_info.is_main)

    def body():
        run = training.prepare(args, dist_info, log)   # validates everything before writing anything
        device = dist_info.device
        model = run.model   # `python train.py`: one process, no process group, no DDP needed
        if is_distributed():
            model = DDP(run.model, device_ids=[device.index] if device.type == "cuda" else None)
        # torch.compile (--compile) wraps only this forward; run.model stays the plain module that
        # the EMA follows and the checkpoints save.
        forward = training.training_forward(model, run)
        training.log_fast_path(run, compiled=args.compile)
        opt, ema = run.opt, run.ema

        def train_step(x, y):
            loss = training.diffusion_loss(run, forward, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            fastpath.ema_update(ema, run.model, args.ema_decay)
            return loss

        training.train(run, train_step)

    code = training.run_guarded(body, dist_info, log)
    cleanup_distributed()   # after body() returned: the DDP model is already unreferenced
    return code


if __name__ == "__main__":
    sys.exit(main(training.parse_args(training.build_parser("Train DiC/DiT with PyTorch DDP."))))
