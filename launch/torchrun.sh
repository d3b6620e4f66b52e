#!/usr/bin/env bash
# Run a raptor training command on one or more machines without SLURM, through torchrun.
#
#   launch/torchrun.sh fit configs/dinov2_vitb14_reg_k3.yaml stage=1            # all local GPUs
#   NPROC_PER_NODE=4 launch/torchrun.sh fit CONFIG stage=2 train.init_from=...
#   # two machines (run on each, NODE_RANK=0 on the one whose address is MASTER_ADDR):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh fit CONFIG stage=1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh fit CONFIG stage=1
#
# Arguments are those of `raptor COMMAND CONFIG [key=value ...]` (fit, teacher: any
# config-driven command that trains with Lightning; dmd and probe share the images over the
# ranks, analyze runs on rank 0). torchrun starts NPROC_PER_NODE processes
# per node with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; Lightning
# detects them (TorchElasticEnvironment) and joins that process group instead of starting
# processes itself. trainer.devices and trainer.num_nodes are set from NPROC_PER_NODE and
# NNODES (appended last, so they win over the config). For CPU runs add
# trainer.accelerator=cpu (DDP over gloo).
#
# Environment (defaults):
#   NNODES          number of machines (1)
#   NODE_RANK       this machine's index, 0..NNODES-1 (0)
#   MASTER_ADDR     address of the NODE_RANK=0 machine (127.0.0.1)
#   MASTER_PORT     a free TCP port on it (29500)
#   NPROC_PER_NODE  processes per machine (the number of GPUs, or 1 without GPUs)
#   PYTHON          the interpreter with raptor installed (.venv/bin/python if present, else python3)
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: [NNODES=.. NODE_RANK=.. MASTER_ADDR=.. NPROC_PER_NODE=..] $0 COMMAND CONFIG [key=value ...]" >&2
    exit 2
fi

gpu_count() {
    if command -v nvidia-smi > /dev/null 2>&1; then
        nvidia-smi --list-gpus 2> /dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(gpu_count)
    [ "${NPROC_PER_NODE}" -gt 0 ] || NPROC_PER_NODE=1
fi
if [ -z "${PYTHON:-}" ]; then
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if [ -x "${repo}/.venv/bin/python" ]; then PYTHON=${repo}/.venv/bin/python; else PYTHON=python3; fi
fi

# Inside a SLURM allocation Lightning would pick SLURMEnvironment over torchrun's variables;
# the job name `interactive` is Lightning's documented switch to skip SLURM detection.
if [ -n "${SLURM_NTASKS:-}" ]; then
    echo "torchrun.sh: SLURM variables found; using torchrun's environment (SLURM_JOB_NAME=interactive)." \
         "Use launch/slurm/fit.sbatch for SLURM jobs." >&2
    export SLURM_JOB_NAME=interactive
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "torchrun: ${NNODES} node(s) x ${NPROC_PER_NODE} process(es), node rank ${NODE_RANK}," \
     "master ${MASTER_ADDR}:${MASTER_PORT}" >&2
exec "${PYTHON}" -m torch.distributed.run \
    --nnodes="${NNODES}" \
    --node-rank="${NODE_RANK}" \
    --nproc-per-node="${NPROC_PER_NODE}" \
    --master-addr="${MASTER_ADDR}" \
    --master-port="${MASTER_PORT}" \
    -m raptor.cli "$@" \
    trainer.devices="${NPROC_PER_NODE}" \
    trainer.num_nodes="${NNODES}"
