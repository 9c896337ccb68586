#!/usr/bin/env bash
# The GPU checks of issue 6 as one prepared run, for a session lent a GPU.
#
#   bash tools/gpu_check.sh [tests] [quantizer] [train] [compiled]
#
# With no argument it runs every stage; each stage's output goes to
# $OUT (the device tool's folder; work_dirs/gpu_check elsewhere). The GPU
# image has torch but no OpenMMLab packages: before the call, download the
# pure-Python wheels here into .whl/ (git ignores it) and carry it:
#   for w in mmengine==0.10.7 mmcv-lite==2.1.0 mmpretrain==1.2.0 addict yapf \
#       platformdirs termcolor einops mat4py modelindex model-index \
#       ordered-set 'importlib-metadata<8'; do
#     python -m pip download --no-deps --only-binary=:all: \
#       --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl "$w"; done
# QUICK=1 runs the benchmarks at their smoke-test sizes.
set -o pipefail
OUT=${OUT:-work_dirs/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export PYTHONPATH=$(pwd):$PYTHONPATH PYTHONUNBUFFERED=1
QUICK_FLAG=${QUICK:+--quick}
STAGES=${*:-tests quantizer train compiled}
status=0

run() {  # name, command...
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.txt" || status=1
}

python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
    | tee "$OUT/device.txt"
for stage in $STAGES; do
    case $stage in
        tests) run tests python3 -m pytest -q -p no:cacheprovider \
            tests/quantization/test_fused_and_compile.py \
            tests/quantization/test_double_rounding.py \
            tests/quantization/test_act_quantizer.py \
            tests/quantization/test_layers.py \
            tests/engine/test_alrs.py ;;
        quantizer) run quantizer python3 benchmarks/quantizer.py $QUICK_FLAG ;;
        train) run train_step python3 benchmarks/train_step.py $QUICK_FLAG ;;
        compiled) run train_step_compiled python3 benchmarks/train_step.py \
            --compile $QUICK_FLAG ;;
        *) echo "unknown stage '$stage' (tests, quantizer, train, compiled)"
           exit 2 ;;
    esac
done
# the device brings back 8 files: 5 logs and the 3 CUDA result files
cp benchmarks/results/*cuda*.json "$OUT"/ 2>/dev/null
exit $status
