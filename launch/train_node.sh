#!/usr/bin/env bash
# Train on one node: one process per device (GPU, or CPU processes with gloo).
#
#   NPROC=8 launch/train_node.sh experiment=NAME trainer.max_steps=...
#   NPROC=2 launch/train_node.sh trainer.device=cpu          # the demo on 2 CPU processes
#
# Environment: NPROC (processes on this node, default 8), PYTHON (default python),
# LOG_DIR (the launcher's per-rank workerlog.N files, default ./log), DEVICES (e.g. 0,1,2,3 ->
# the launcher's --devices). All arguments are Hydra overrides for launch/train.py.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NPROC="${NPROC:-8}"
args=(--nproc_per_node "$NPROC")
[[ -n "${LOG_DIR:-}" ]] && args+=(--log_dir "$LOG_DIR")
[[ -n "${DEVICES:-}" ]] && args+=(--devices "$DEVICES")
exec "${PYTHON:-python}" -m paddle.distributed.launch "${args[@]}" "$HERE/train.py" "$@"
