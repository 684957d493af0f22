#!/usr/bin/env bash
# Wrapper with the upstream release's call form:  launch/run_infer.sh GPU_INDEX CONFIG
#
#   GPU_INDEX  exported as CUDA_VISIBLE_DEVICES (e.g. 0; "" or -1 runs on the CPU).
#   CONFIG     a text file of launch/infer.py overrides, one `key=value` per line. Blank lines and
#              lines starting with `#` are ignored, as is anything after ` #` on a line; leading
#              and trailing spaces are trimmed; values are passed to Hydra as written (quote them
#              Hydra-style if they hold spaces or special characters). Any further arguments are
#              appended as extra overrides. Example CONFIG:
#
#                  # COCO-CN test, released weights
#                  test_file=data/coco-cn-test.tsv
#                  output_file=out/coco-cn-test.emb
#                  model.init_from=weights/ernie_vil_2.0_base.pdparams
#                  vocab_file=../shared/assets/ernie-3.0-base-zh/vocab.txt
#                  batch_size=64          # images per forward pass
#
# The upstream run_infer.sh took a YAML file; its keys map to: test_file, output_file, vocab_file,
# infer_batch_size -> batch_size, max_text_seqlen -> text_max_length, init_from_params -> model.init_from.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 GPU_INDEX CONFIG [extra key=value ...]" >&2
    exit 2
fi
gpu="$1"
config="$2"
shift 2
if [[ ! -f "$config" ]]; then
    echo "$0: config file not found: $config" >&2
    exit 2
fi

export CUDA_VISIBLE_DEVICES="$gpu"
export LANG="${LANG:-C.UTF-8}"

overrides=()
lineno=0
while IFS= read -r line || [[ -n "$line" ]]; do
    lineno=$((lineno + 1))
    line="${line%$'\r'}"
    line="${line%%[[:space:]]#*}"            # trailing comment
    line="${line#"${line%%[![:space:]]*}"}"  # leading spaces
    line="${line%"${line##*[![:space:]]}"}"  # trailing spaces
    [[ -z "$line" || "$line" == \#* ]] && continue
    if [[ "$line" != *=* ]]; then
        echo "$0: $config:$lineno: expected key=value, got: $line" >&2
        exit 2
    fi
    overrides+=("$line")
done < "$config"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/infer.py" "${overrides[@]}" "$@"
