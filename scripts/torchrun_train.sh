#!/bin/bash
# One training run on several machines with torchrun: run this on every node with the same
# NNODES, RDZV_HOST (the first node) and RDZV_PORT, and one GPU process per GPU (NPROC).
#   NNODES=2 NPROC=4 RDZV_HOST=node0 scripts/torchrun_train.sh [override ...]
# The nodes meet through torchrun's c10d rendezvous; the first rank to join is rank 0 and its
# run directory is the run's (give a fixed hydra.run.dir to resume a stopped run).
set -euo pipefail
NNODES="${NNODES:-2}"
NPROC="${NPROC:-1}"
RDZV_HOST="${RDZV_HOST:?set RDZV_HOST to the first node}"
RDZV_PORT="${RDZV_PORT:-29400}"

exec torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id=leukemia-train \
    -m leukemia_mlops.train trainer=ddp "trainer.num_nodes=$NNODES" "trainer.devices=$NPROC" "$@"
