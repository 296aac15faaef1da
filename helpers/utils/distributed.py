"""torchrun set-up and teardown that is right on one process, one node or many nodes.

The device comes from LOCAL_RANK (the GPU index on this node), data sharding and seeds
from the global RANK; the official scripts mixed the two up on multi-node runs.

exit_with_parent: torchrun starts each worker in its own session (start_new_session=True), so
killing torchrun's process group leaves the workers running. setup_distributed calls
exit_with_parent() in every torchrun worker, which then receives SIGTERM when its launcher dies.
"""
import ctypes
import datetime
import gc
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

PR_SET_PDEATHSIG = 1            # <linux/prctl.h>


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


def setup_distributed(timeout_minutes=None):
    """Join the torchrun job (nccl on GPU, gloo on CPU), or run as a single process.

    Running `python train.py` without torchrun is allowed: it is a job of one process and
    needs no process group, which is what a laptop user expects.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:   # a torchrun worker: must not outlive its launcher
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
        kwargs = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        dist.init_process_group(backend=backend, **kwargs)
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
    if is_distributed() and not _abandoned:
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


_abandoned = False


def abandon_process_group():
    """A collective timed out: the teardown must not wait for the missing ranks again."""
    global _abandoned
    _abandoned = True


class Heartbeat:
    """Each rank records in the job's store (torchrun's TCPStore) the step whose collective it is
    entering; when one times out, `behind(step)` names the ranks that did not arrive (a store write
    per step: well under a millisecond)."""

    PREFIX = "dic/heartbeat/"

    def __init__(self, rank, world_size, step=0):
        self.rank, self.world_size = rank, world_size
        self.store = dist.distributed_c10d._get_default_store() if is_distributed() else None
        self.arrive(step)

    def arrive(self, step):
        self.step = step
        if self.store is not None:
            self.store.set(f"{self.PREFIX}{self.rank}", str(step))

    def behind(self, step):
        """[(rank, the step it last arrived at)] of the ranks short of `step` (None: unknown)."""
        if self.store is None:
            return None
        try:
            self.store.set_timeout(datetime.timedelta(seconds=10))
            seen = [int(self.store.get(f"{self.PREFIX}{r}")) for r in range(self.world_size)]
        except Exception:  # noqa: BLE001 - the store itself is unreachable: nothing to name
            return None
        return [(r, s) for r, s in enumerate(seen) if s < step]


def _poll_parent(parent, sig, interval):
    """Non-Linux fallback: signal ourselves once the parent process is gone."""
    while os.getppid() == parent:
        time.sleep(interval)
    os.kill(os.getpid(), sig)


def exit_with_parent(sig=signal.SIGTERM, parent=None, interval=1.0):
    """Make this process get `sig` when its parent (the launcher, e.g. torchrun) dies.

    Linux: prctl(PR_SET_PDEATHSIG); then, in case the parent died before that call, a check
    that the parent is still `parent` (default: the parent now; orphans have ppid 1). Elsewhere
    a daemon thread polls os.getppid() every `interval` seconds. Returns the mechanism used.
    """
    expected = os.getppid() if parent is None else int(parent)
    if expected == 1:           # already orphaned (adopted by init)
        os.kill(os.getpid(), sig)
        return "orphaned"
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
                if os.getppid() != expected:       # died between our start and prctl
                    os.kill(os.getpid(), sig)
                return "prctl"
        except (OSError, AttributeError):
            pass
    thread = threading.Thread(target=_poll_parent, args=(expected, sig, interval),
                              name="exit_with_parent", daemon=True)
    thread.start()
    return "poll"
