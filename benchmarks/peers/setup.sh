#!/usr/bin/env bash
# The CPU peers of the benchmark (bench.py --peers openvino,ctranslate2): a venv of their own, never runner's,
# and the model converted to each peer's format. From the repository root:
#
#   bash benchmarks/peers/setup.sh                  # the demo model (SmolLM2-135M-Instruct, offline)
#   bash benchmarks/peers/setup.sh --model FOLDER   # any local transformers model folder (save_pretrained)
#
# 1. The venv (benchmarks/peers/.venv, or --venv DIR): the pins of requirements.txt, then optimum-intel with
#    --no-deps (see requirements.txt). Skipped when the venv was made from exactly these pins.
# 2. $RUNNER_CACHE/peers/<model folder name>/openvino      optimum-cli export openvino --weight-format fp32
#    $RUNNER_CACHE/peers/<model folder name>/ctranslate2   ct2-transformers-converter --quantization float32
#    Each is written to a temporary folder, moved into place and then marked done by export.json (written
#    last, what bench.py looks for); a folder that has its export.json is kept as it is. Each converter's
#    messages go to <peer>.log beside it.
# Nothing but pip packages is downloaded: the model is a local folder (HF_HUB_OFFLINE=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=benchmarks/peers
VENV=$HERE/.venv
PY=${PYTHON:-.venv/bin/python}  # runner's python, to find the demo model's folder
OPTIMUM_INTEL=optimum-intel==2.2.0
MODEL=""
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=$2; shift 2 ;;
        --venv) VENV=$2; shift 2 ;;
        -h|--help) sed -n 2,16p "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

install_venv() {
    local stamp=$VENV/peers-requirements.txt want
    want=$(cat "$HERE/requirements.txt"; echo "$OPTIMUM_INTEL --no-deps")
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        echo "venv: $VENV already has these pins"
        return
    fi
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$HERE/requirements.txt"
    "$VENV/bin/pip" install -q --no-deps "$OPTIMUM_INTEL"
    echo "$want" > "$stamp"
    echo "venv: installed into $VENV: $("$VENV/bin/pip" list 2>/dev/null | grep -iE '^(openvino|ctranslate2|optimum|torch|transformers) ' | tr -s ' ' | paste -sd, -)"
}

# convert PEER COMMAND...: unless $CACHE/PEER/export.json exists, run COMMAND, which writes $CACHE/PEER.tmp.$$
# (tmp PEER), and move that into place.
tmp() { echo "$CACHE/$1.tmp.$$"; }
convert() {
    local peer=$1; shift
    local dest=$CACHE/$peer
    if [ -f "$dest/export.json" ]; then
        echo "$peer: $dest already converted"
        return
    fi
    local TMP
    TMP=$(tmp "$peer")
    rm -rf "$TMP" "$dest"
    mkdir -p "$CACHE"
    local t0=$SECONDS
    if ! "$@" > "$CACHE/$peer.log" 2>&1; then
        tail -20 "$CACHE/$peer.log" >&2
        echo "$peer: conversion failed, messages in $CACHE/$peer.log" >&2
        rm -rf "$TMP"
        exit 1
    fi
    mv "$TMP" "$dest"
    "$VENV/bin/python" -c 'import json, sys; print(json.dumps({"peer": sys.argv[1], "source": sys.argv[2], "command": sys.argv[3:]}))' \
        "$peer" "$MODEL" "$@" > "$dest/export.json"
    echo "$peer: converted $MODEL -> $dest in $((SECONDS - t0)) s ($(du -sh "$dest" | cut -f1))"
}

install_venv
if [ -z "$MODEL" ]; then
    if ! command -v "$PY" > /dev/null; then
        echo "setup.sh: runner's python $PY not found: set PYTHON=... to it, or pass --model FOLDER" >&2
        exit 2
    fi
    MODEL=$(PYTHONPATH=$PWD "$PY" -c "from runner.models import DEMO_MODEL, resolve_model; print(resolve_model(DEMO_MODEL))")
fi
MODEL=$(cd "$MODEL" && pwd)
CACHE=${RUNNER_CACHE:-$HOME/.cache/runner}/peers/$(basename "$MODEL")
convert openvino "$VENV/bin/optimum-cli" export openvino --model "$MODEL" --task text-generation-with-past \
    --weight-format fp32 "$(tmp openvino)"
convert ctranslate2 "$VENV/bin/ct2-transformers-converter" --model "$MODEL" --quantization float32 \
    --output_dir "$(tmp ctranslate2)"
