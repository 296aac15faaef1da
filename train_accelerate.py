"""
Train DiC (or DiT) through Hugging Face accelerate: train.py's loop, data, checkpoints and exact
resume, with accelerate supplying the processes, the model wrapper, backward and mixed precision.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_accelerate.py \
        --model DiC-XL --feature-path /path/to/features
    accelerate launch --mixed_precision fp16 train_accelerate.py --model DiC-S --data-path ... --resume auto
    # two CPU processes (accelerate launch --cpu starts only one):
    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 train_accelerate.py --model DiC-Tiny --dataset digits

Mixed precision comes from `accelerate launch --mixed_precision` (or ACCELERATE_MIXED_PRECISION);
`--precision bf16` asks for bf16 directly. The EMA stays in fp32; a fp16 GradScaler's state is
saved in the checkpoints and restored on resume.
"""
import sys
from contextlib import nullcontext

from datetime import timedelta

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

import train
from helpers.training import setup as training
from helpers.utils.cli import run_main
from helpers.utils.distributed import DistInfo, cleanup_distributed


class AccelerateEngine:
    """train.py's engine interface (see train.DDPEngine) on top of an accelerate.Accelerator."""

    def __init__(self, precision, timeout_minutes=None):
        handlers = [] if timeout_minutes is None else [InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))]
        self.accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else None,
                                       kwargs_handlers=handlers)
        a = self.accelerator
        self.dist = DistInfo(rank=a.process_index, local_rank=a.local_process_index,
                             world_size=a.num_processes, device=a.device)
        self.mixed_precision = a.mixed_precision

    @property
    def scaler(self):
        return self.accelerator.scaler   # fp16's GradScaler (None otherwise): checkpointed with the run

    def prepare(self, model, opt):
        """DDP and autocast (outputs in fp32) by accelerate."""
        return self.accelerator.prepare(model, opt)

    def describe(self):
        a = self.accelerator
        return f"accelerate: {a.num_processes} processes on {a.device}, mixed precision {a.mixed_precision}"

    def forward(self, model, args, device):
        # Autocast is accelerate's; --compile compiles the prepared model unless accelerate's own
        # dynamo option (e.g. `accelerate launch --dynamo_backend inductor`) compiled it already.
        return training.training_forward(model, device, args.precision, args.compile, args.channels_last,
                                         autocast=False)

    def backward(self, loss):
        self.accelerator.backward(loss)

    def clip_grad_norm_(self, parameters, max_norm):
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def no_sync(self, model, sync):
        """accelerate's no_sync for the micro-batches before the last of a step."""
        return nullcontext() if sync else self.accelerator.no_sync(model)

    def close(self):
        self.accelerator.free_memory()
        cleanup_distributed()


def main(args):
    """train.py's main with accelerate's engine."""
    train.main(args, AccelerateEngine(args.precision, args.dist_timeout))


if __name__ == "__main__":
    sys.exit(run_main(main, train.parse_args(description="Train DiC/DiT with accelerate.")))
