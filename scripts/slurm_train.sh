#!/bin/bash
# Train DiC-XL on several nodes of 8 GPUs with SLURM; resubmitting (or a requeue after
# preemption) continues the newest run from its newest checkpoint (--resume auto).
#
#   FEATURE_PATH=/data/imagenet256_features sbatch --nodes 4 scripts/slurm_train.sh
#   FEATURE_PATH=... RESULTS_DIR=/ckpt/dic MODEL=DiC-XL sbatch scripts/slurm_train.sh --max-steps 400000
#
# Extra arguments go to train.py. One srun task per node runs torchrun, which starts the 8
# processes of its node and meets the other nodes at the first node (c10d rendezvous).
# Adapt the partition/account lines and the environment set-up to your cluster.
#
# Preemption and the time limit: SLURM sends this batch shell SIGUSR1 PREEMPT_SECONDS (--signal,
# below) before the time limit, and SIGTERM when it preempts the job. The shell forwards the signal
# to srun, srun to torchrun on every node, torchrun (--signals-to-handle: it forwards only SIGTERM,
# SIGINT, SIGHUP and SIGQUIT by default, and dies of SIGUSR1) to its workers; they finish the step
# they are in, save it and exit 75 (EX_TEMPFAIL). torchrun waits --shutdown-timeout seconds for
# them, then kills them: keep it below the signal's lead time and above a step plus a checkpoint
# save. The shell then requeues the job, which continues bit-exactly with --resume auto.
#
#SBATCH --job-name=dic-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=B:USR1@300
##SBATCH --partition=...
##SBATCH --account=...

set -euo pipefail

FEATURE_PATH=${FEATURE_PATH:?set FEATURE_PATH to the folder written by extract_features.py}
MODEL=${MODEL:-DiC-XL}
RESULTS_DIR=${RESULTS_DIR:-results}
GPUS_PER_NODE=8
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}   # < the --signal lead time (300 s)
EXIT_PREEMPTED=75                           # train.py's exit code after saving on a stop signal
# sed reads all of scontrol's output: `head -n 1` would exit first and, under pipefail, kill the job by SIGPIPE
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MASTER_PORT=${MASTER_PORT:-29500}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs, rendezvous at $MASTER_ADDR:$MASTER_PORT"

stopped="" srun_pid=""
forward() {   # the signal goes on to srun (and from there to torchrun and the workers)
    stopped=$1
    echo "job $SLURM_JOB_ID: got SIG$1, forwarding it; the run saves its step and the job is requeued"
    kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    train.py --model "$MODEL" --feature-path "$FEATURE_PATH" --results-dir "$RESULTS_DIR" \
    --resume auto "$@" &
srun_pid=$!
status=0
while true; do   # a trapped signal interrupts `wait`: wait again until srun has really ended
    wait "$srun_pid" && status=0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
# torchrun exits 1 after forwarding a signal (its own SignalException); `python train.py` exits 75.
if [ -n "$stopped" ] || [ "$status" -eq "$EXIT_PREEMPTED" ]; then
    echo "job $SLURM_JOB_ID: stopped (status $status); requeueing it to continue with --resume auto"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
