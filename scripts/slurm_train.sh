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
#SBATCH --job-name=dic-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=...
##SBATCH --account=...

set -euo pipefail

FEATURE_PATH=${FEATURE_PATH:?set FEATURE_PATH to the folder written by extract_features.py}
MODEL=${MODEL:-DiC-XL}
RESULTS_DIR=${RESULTS_DIR:-results}
GPUS_PER_NODE=8
# sed reads all of scontrol's output: `head -n 1` would exit first and, under pipefail, kill the job by SIGPIPE
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MASTER_PORT=${MASTER_PORT:-29500}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs, rendezvous at $MASTER_ADDR:$MASTER_PORT"

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    train.py --model "$MODEL" --feature-path "$FEATURE_PATH" --results-dir "$RESULTS_DIR" \
    --resume auto "$@"
