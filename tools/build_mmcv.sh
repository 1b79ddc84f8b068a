#!/usr/bin/env bash
# Build mmcv 2.1.0 WITH its compiled ops once, cache the wheel outside the repo, and install it.
#
# mmdet 3.3.0 / mmsegmentation 1.2.2 need mmcv 2.1.0 with ops (RoIAlign, NMS, ...), and PyPI has no wheel of it
# for torch 2.14.1, so it is built from the PyPI source distribution:
#   * its setup.py asks for -std=c++14/17, but torch 2.14's headers need C++20: the flags are rewritten;
#   * its setup.py needs setuptools<70 (+ wheel), installed into a private folder put first on PYTHONPATH
#     (the venv's own setuptools is left as it is);
#   * CPU ops only (FORCE_CUDA=0), built with the venv's torch (--no-build-isolation).
# It takes about 15-25 minutes on 2 cores. Idempotent: when the cached wheel exists it is only (re)installed.
#
# Usage: bash tools/build_mmcv.sh [PYTHON]   (default: .venv/bin/python)
# Env:   VISADAPT_WHEEL_CACHE (default ~/.cache/visadapt/wheels), MAX_JOBS (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; *) PY="$(command -v "$PY")" ;; esac
MMCV_VERSION=2.1.0
CACHE="${VISADAPT_WHEEL_CACHE:-$HOME/.cache/visadapt/wheels}"
mkdir -p "$CACHE"

pytag="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
find_wheel() { ls "$CACHE"/mmcv-"$MMCV_VERSION"-"$pytag"-*.whl 2>/dev/null | head -n 1 || true; }

have_ops() {
  "$PY" - <<'EOF' 2>/dev/null
import mmcv, mmcv.ops  # noqa: F401  (mmcv.ops needs the compiled mmcv._ext)
from mmcv.ops import nms  # noqa: F401
assert mmcv.__version__ == "2.1.0"
EOF
}

wheel="$(find_wheel)"
if [ -z "$wheel" ]; then
  if have_ops; then
    echo "build_mmcv: mmcv $MMCV_VERSION with ops is already installed (no cached wheel to reuse)"
    exit 0
  fi
  work="$(mktemp -d "${TMPDIR:-/tmp}/visadapt-mmcv.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  echo "build_mmcv: building mmcv $MMCV_VERSION with CPU ops in $work (15-25 min) ..."
  # torch's extension builder compiles in parallel only when a `ninja` executable is on PATH
  export PATH="$(dirname "$PY"):$PATH"
  command -v ninja >/dev/null || "$PY" -m pip install -q ninja
  "$PY" -m pip install -q --no-warn-conflicts --target "$work/setuptools" "setuptools<70" wheel
  export PYTHONPATH="$work/setuptools${PYTHONPATH:+:$PYTHONPATH}"
  # pip prepares the sdist's metadata with the venv's torch and the old setuptools (no isolated build env)
  "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$work/src"
  tar -xzf "$work"/src/mmcv-"$MMCV_VERSION".tar.gz -C "$work"
  srcdir="$work/mmcv-$MMCV_VERSION"
  sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$srcdir/setup.py"
  grep -q -- '-std=c++20' "$srcdir/setup.py" || { echo "build_mmcv: C++ standard flag not found in setup.py" >&2; exit 1; }
  (
    cd "$srcdir"
    # -g0: no debug info (the default -g makes the build slower and the wheel several times larger)
    MMCV_WITH_OPS=1 FORCE_CUDA=0 CFLAGS="${CFLAGS:-} -g0" CXXFLAGS="${CXXFLAGS:-} -g0" \
      MAX_JOBS="${MAX_JOBS:-2}" \
      "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$work/dist"
  )
  built="$(ls "$work"/dist/mmcv-"$MMCV_VERSION"-*.whl)"
  # atomic publish into the cache: copy under a temporary name, then rename
  cp "$built" "$CACHE/.tmp-$(basename "$built")"
  mv -f "$CACHE/.tmp-$(basename "$built")" "$CACHE/$(basename "$built")"
  wheel="$(find_wheel)"
fi

unset PYTHONPATH
if ! have_ops; then
  "$PY" -m pip install -q --no-deps --force-reinstall "$wheel"
fi
# mmcv's own runtime dependencies (installed --no-deps above so that nothing touches torch)
"$PY" -m pip install -q "mmengine>=0.3.0" addict packaging Pillow pyyaml yapf opencv-python
have_ops || { echo "build_mmcv: mmcv.ops does not import after installing $wheel" >&2; exit 1; }
echo "build_mmcv: mmcv $MMCV_VERSION with ops installed from $wheel"
