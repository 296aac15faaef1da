"""
Train DiC (or DiT) through Hugging Face accelerate: the same recipe, data, checkpoints and exact
resume as train.py (everything but the accelerate calls lives in helpers/training.py).

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_accelerate.py \
        --model DiC-XL --feature-path /path/to/features
    accelerate launch --mixed_precision fp16 train_accelerate.py --model DiC-S --data-path ... --resume auto
    # two CPU processes (accelerate launch --cpu starts only one):
    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 train_accelerate.py --model DiC-Tiny --dataset digits

Mixed precision comes from `accelerate launch --mixed_precision` (or ACCELERATE_MIXED_PRECISION);
`--precision bf16` asks for bf16 directly. The EMA stays in fp32; a fp16 GradScaler's state is
saved in the checkpoints and restored on resume. The fast-path flags (--fused-adamw,
--channels-last, --compile) are train.py's; --compile compiles the prepared model.
"""
import sys

from accelerate import Accelerator

from helpers import fastpath, training
from helpers.distributed import DistInfo, cleanup_distributed
from helpers.log import RunLogger


def main(args):
    """Train a model; returns the process exit code (0, or non-zero after a one-line error)."""
    accelerator = Accelerator(mixed_precision="bf16" if args.precision == "bf16" else None)
    dist_info = DistInfo(rank=accelerator.process_index, local_rank=accelerator.local_process_index,
                         world_size=accelerator.num_processes, device=accelerator.device)
    log = RunLogger(dist_info.is_main)
    args.mixed_precision = accelerator.mixed_precision

    def body():
        run = training.prepare(args, dist_info, log)   # validates everything before writing anything
        model, opt = accelerator.prepare(run.model, run.opt)   # DDP + autocast (outputs in fp32)
        log.info(f"accelerate: {accelerator.num_processes} processes on {accelerator.device}, "
                 f"mixed precision {accelerator.mixed_precision}")
        # --compile: torch.compile of the prepared model (not twice where accelerate's own dynamo
        # option, e.g. `accelerate launch --dynamo_backend inductor`, compiled it already).
        # Autocast is accelerate's (--precision bf16 set mixed_precision above).
        forward = training.training_forward(model, run, autocast=False)
        training.log_fast_path(run, compiled=args.compile or hasattr(model, "_orig_mod"),
                               accelerate_precision=accelerator.mixed_precision)

        def train_step(x, y):
            loss = training.diffusion_loss(run, forward, x, y)
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if args.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            fastpath.ema_update(run.ema, run.model, args.ema_decay)   # run.model: the unwrapped fp32 module
            return loss

        training.train(run, train_step, scaler=accelerator.scaler)

    code = training.run_guarded(body, dist_info, log)
    accelerator.free_memory()
    cleanup_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main(training.parse_args(training.build_parser("Train DiC/DiT with accelerate."))))
