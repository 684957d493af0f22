#!/usr/bin/env bash
# Train on several nodes: run this once on every node, with the same --master and --nnodes and
# that node's --rank (0 .. N-1). The launcher on the host named in --master serves the rendezvous
# there (paddle's HTTP key-value master; the port must be free and reachable from every node);
# with K processes per node, the global ranks of node R are R*K .. R*K+K-1.
#
#   launch/train_multinode.sh --master 10.0.0.1:8090 --nnodes 4 --rank 0 --nproc_per_node 8 -- experiment=NAME
#   launch/train_multinode.sh --master 10.0.0.1:8090 --nnodes 4 --rank 1 --nproc_per_node 8 -- experiment=NAME
#   ...
#
# Options (paddle.distributed.launch's flags of the same names):
#   --master HOST:PORT      rendezvous address (required)
#   --nnodes N              number of nodes (required)
#   --rank R                this node's rank, 0 <= R < N (required)
#   --nproc_per_node K      processes (devices) on this node (default: $nproc or 8)
#   --log_dir DIR           per-rank workerlog.N files (default ./log)
#   --job_id ID             job name (default ernievil2)
#   --devices LIST          devices of this node, e.g. 0,1,2,3
# Everything after -- goes to launch/train.py as Hydra overrides. PYTHON selects the interpreter.
# All nodes must see the same code and data (e.g. a shared file system); the Hydra run dir is
# made on every node, rank 0 writes checkpoints and metrics in its own.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit "${1:-2}"; }
die() { echo "train_multinode.sh: $*" >&2; usage 2; }

master="" nnodes="" node_rank="" nproc="${NPROC:-8}" log_dir="" job_id="ernievil2" devices=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --master) master="${2:-}"; shift 2 || die "--master needs a value" ;;
    --nnodes) nnodes="${2:-}"; shift 2 || die "--nnodes needs a value" ;;
    --rank) node_rank="${2:-}"; shift 2 || die "--rank needs a value" ;;
    --nproc_per_node) nproc="${2:-}"; shift 2 || die "--nproc_per_node needs a value" ;;
    --log_dir) log_dir="${2:-}"; shift 2 || die "--log_dir needs a value" ;;
    --job_id) job_id="${2:-}"; shift 2 || die "--job_id needs a value" ;;
    --devices) devices="${2:-}"; shift 2 || die "--devices needs a value" ;;
    --master=*) master="${1#*=}"; shift ;;
    --nnodes=*) nnodes="${1#*=}"; shift ;;
    --rank=*) node_rank="${1#*=}"; shift ;;
    --nproc_per_node=*) nproc="${1#*=}"; shift ;;
    --log_dir=*) log_dir="${1#*=}"; shift ;;
    --job_id=*) job_id="${1#*=}"; shift ;;
    --devices=*) devices="${1#*=}"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (Hydra overrides go after --)" ;;
  esac
done

[[ "$master" =~ ^[^:]+:[0-9]+$ ]] || die "--master HOST:PORT is required (got '$master')"
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "--nnodes N (a positive integer) is required (got '$nnodes')"
[[ "$node_rank" =~ ^[0-9]+$ ]] || die "--rank R (0 .. nnodes-1) is required (got '$node_rank')"
(( node_rank < nnodes )) || die "--rank $node_rank must be below --nnodes $nnodes"
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc_per_node must be a positive integer (got '$nproc')"

args=(--master "$master" --nnodes "$nnodes" --rank "$node_rank" --nproc_per_node "$nproc" --job_id "$job_id")
[[ -n "$log_dir" ]] && args+=(--log_dir "$log_dir")
[[ -n "$devices" ]] && args+=(--devices "$devices")
exec "${PYTHON:-python}" -m paddle.distributed.launch "${args[@]}" "$HERE/train.py" "$@"
