#!/usr/bin/env bash
# Train a step_lightning config with DDP over several machines through torchrun (no scheduler).
#
# Usage: run the same command on every node, with that node's NODE_RANK (0 on the master node):
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 NNODES=2 GPUS_PER_NODE=8 \
#       scripts/torchrun_multinode.sh configs/cifar10/resnet18.yaml --config configs/recipes/step_2of4.yaml \
#       [extra `python -m step_lightning fit` arguments]
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 NNODES=2 GPUS_PER_NODE=8 \
#       scripts/torchrun_multinode.sh configs/cifar10/resnet18.yaml --config configs/recipes/step_2of4.yaml \
#       [same extra arguments]
# The first argument is the task config; the recipe config (or none: dense) and any other `fit` argument follow.
# Environment:
#   NODE_RANK      this node's index, 0 .. NNODES-1 (required)
#   MASTER_ADDR    address of node 0, reachable from every node (required)
#   MASTER_PORT    a free TCP port on node 0 (default 29500)
#   NNODES         number of nodes (default 1)
#   GPUS_PER_NODE  processes per node, one per GPU (default 1)
# Resume: pass `--ckpt_path logs/<task>/<model>/<recipe>/version_<n>/checkpoints/last.ckpt` on every node (a path all nodes
# can read). Logs and checkpoints are written by global rank 0, on node 0.
# Local test on one machine, CPU: two shells with NODE_RANK=0 and 1, MASTER_ADDR=127.0.0.1, and the extra
# argument `--trainer.accelerator cpu`.

set -euo pipefail

CONFIG="${1:-}"
if [[ -z "$CONFIG" || ! -f "$CONFIG" ]]; then
    echo "torchrun_multinode.sh: CONFIG '${CONFIG}' is not a file; pass a config path as the first argument" \
         "(e.g. configs/quickstart.yaml)." >&2
    exit 2
fi
shift
: "${NODE_RANK:?set NODE_RANK (0 on the master node, 1 .. NNODES-1 on the others)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of the NODE_RANK=0 node)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-1}"

exec torchrun \
    --nnodes "$NNODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    -m step_lightning fit \
    --config "$CONFIG" \
    --trainer.num_nodes "$NNODES" \
    --trainer.devices "$GPUS_PER_NODE" \
    --trainer.strategy ddp \
    "$@"
