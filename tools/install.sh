#!/usr/bin/env bash
# Fresh-machine install of mmdrq and its OpenMMLab stack into the active
# Python (a venv or conda env is recommended). Pinned, tested versions:
#   torch 2.14.1 + torchvision 0.29.1, mmengine 0.10.7, mmcv 2.1.0 (built
#   from the sdist with its CPU ops), mmpretrain 1.2.0, mmdet 3.3.0,
#   mmsegmentation 1.2.2 (+ ftfy, regex), onnx 1.23.2 + onnxruntime 1.32.0
#   + onnxscript 0.7.2 (ONNX export and runtime), scikit-image 0.26.0 (the
#   real-image detection/segmentation data), transformers 4.51.3 (the
#   language-model path; newer ones break mmpretrain's import), then mmdrq.
# If PIP_FIND_LINKS points at a folder holding a matching mmcv 2.1.0 wheel,
# that wheel is used instead of the ~30 minute build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

echo '[mmdrq] torch 2.14.1 + torchvision 0.29.1'
if ! "$PY" -c 'import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")))' 2>/dev/null; then
  pip_install torch==2.14.1 torchvision==0.29.1
fi
# Every later step must keep this torch: a dependency may not pull another.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" - >"$constraints" <<'PYEOF'
import torch, torchvision
print('torch==' + torch.__version__.split('+')[0])
print('torchvision==' + torchvision.__version__.split('+')[0])
print('setuptools<82')  # mmengine resolves mmdet:: configs via pkg_resources
PYEOF
pip_install -c "$constraints" 'setuptools>=77.0.3,<82' ninja wheel

echo '[mmdrq] mmcv 2.1.0 with CPU ops'
if "$PY" -c 'import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != "2.1.0")' 2>/dev/null; then
  echo '[mmdrq] mmcv 2.1.0 already installed'
elif [ -n "${PIP_FIND_LINKS:-}" ] && pip_install -c "$constraints" --only-binary mmcv mmcv==2.1.0; then
  echo "[mmdrq] mmcv 2.1.0 from wheel in $PIP_FIND_LINKS"
else
  # PyPI has only the sdist. Its setup.py says -std=c++17, torch 2.14's
  # headers need C++20; build isolation would silently skip the ops.
  build=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary :all: mmcv==2.1.0 -d "$build"
  tar -xzf "$build"/mmcv-2.1.0.tar.gz -C "$build"
  sed -i 's/-std=c++17/-std=c++20/g' "$build"/mmcv-2.1.0/setup.py
  pip_install -c "$constraints" addict numpy packaging Pillow pyyaml yapf opencv-python mmengine==0.10.7
  MAX_JOBS=${MAX_JOBS:-2} pip_install -c "$constraints" --no-cache-dir --no-build-isolation "$build"/mmcv-2.1.0
  rm -rf "$build"
fi

echo '[mmdrq] mmengine, mmpretrain, mmdet, mmseg, test tools, mmdrq'
pip_install -c "$constraints" mmengine==0.10.7 mmpretrain==1.2.0 mmdet==3.3.0 \
  mmsegmentation==1.2.2 ftfy regex scipy matplotlib scikit-learn pytest
echo '[mmdrq] scikit-image (sample images of tools/make_real_datasets.py)'
pip_install -c "$constraints" scikit-image==0.26.0
echo '[mmdrq] onnx, onnxruntime, onnxscript (torch.onnx dynamo exporter)'
pip_install -c "$constraints" onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2
echo '[mmdrq] transformers (the language-model path, mmdrq/llm)'
pip_install -c "$constraints" transformers==4.51.3
pip_install -c "$constraints" --no-deps --no-build-isolation --force-reinstall .
"$PY" -c 'import mmcv.ops, mmpretrain.models, mmdet, mmseg, onnxruntime, transformers, mmdrq; print("[mmdrq] installed", mmdrq.__version__)'
