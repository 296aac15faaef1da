"""How a training run ends early without losing anything: a stop signal (preemption) saves the
step it reached and exits 75 for a requeue; a rank that never reaches a step's collectives within
--dist-timeout is named, with the last step every rank completed and the last good checkpoint."""
from contextlib import contextmanager

import torch.distributed as dist

from helpers.training.runs import checkpoint_path, last_good_checkpoint, save_checkpoint
from helpers.utils.cli import EXIT_RUN_FAILED, JobError, Stopped
from helpers.utils.distributed import abandon_process_group


@contextmanager
def naming_hung_ranks(heartbeat, run, progress, timeout_minutes):
    """A collective of the loop that fails (--dist-timeout passed) while some rank never arrived at
    the step: one line naming those ranks (printed by the lowest rank that did arrive), the last
    step every rank completed and the last good checkpoint."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        behind = heartbeat.behind(heartbeat.step)
        if not behind:
            raise
        abandon_process_group()   # the teardown must not wait for them again
        arrived = [r for r in range(run.world_size) if r not in dict(behind)]
        last = last_good_checkpoint(run.run_dir, progress.last_saved)
        raise JobError(f"rank(s) {', '.join(str(r) for r, _ in behind)} did not arrive at step {heartbeat.step} "
                       f"within --dist-timeout {timeout_minutes:g} min (a stuck data loader, file system or "
                       f"deadlock); every rank completed step {min(s for _, s in behind)}; {last}",
                       code=EXIT_RUN_FAILED, rank=arrived[0] if arrived else run.rank) from e


def stop_at_step(run, progress, steps_per_epoch, flags, global_batch_size, scaler, stop):
    """A stop signal reached a process during this step: save it (unless just saved) and raise
    Stopped (exit code 75, a requeue for scripts/slurm_train.sh)."""
    if progress.last_saved != progress.step:
        save_checkpoint(run, progress, steps_per_epoch, flags, global_batch_size, scaler)
    received = f"{stop.name} received" if stop is not None and stop.requested else "a process received a stop signal"
    raise Stopped(f"{received}: stopped at step {progress.step} with its checkpoint "
                  f"{checkpoint_path(run.run_dir, progress.step)}; run again with --resume auto to continue")
