"""torchrun set-up and teardown that is right on one process, one node or many nodes.

The device comes from LOCAL_RANK (the GPU index on this node), data sharding and seeds
from the global RANK; the official scripts mixed the two up on multi-node runs.
"""
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits in the job."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed():
    """Join the torchrun job (nccl on GPU, gloo on CPU), or run as a single process.

    Running `python train.py` without torchrun is allowed: it is a job of one process and
    needs no process group, which is what a laptop user expects.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:   # a torchrun worker: must not outlive its launcher
        from helpers.locks import exit_with_parent
        exit_with_parent()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def barrier():
    """Wait for every process; a no-op in a single-process job."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src=0):
    """Send a picklable object from rank `src` to every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every process (over the network: right on many nodes);
    [obj] in a single-process job."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup_distributed():
    """Tear the process group down in the order that keeps gloo from crashing at exit.

    gloo aborts ("terminate called without an active exception") in a large share of runs
    unless every rank reaches a barrier and the DDP objects are garbage collected first;
    callers should drop their DDP model before calling this.
    """
    if is_distributed():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()

