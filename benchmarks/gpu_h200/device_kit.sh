#!/bin/bash
# Build .devkit/ for a GPU machine that has torch but no ffcv/submitit and no package registry (the lent H200:
# Python 3.12, torch 2.11): ffcv 1.0.2 built here for that Python against Debian 12's OpenCV and libjpeg-turbo,
# whose shared libraries (and theirs, glibc's own left out) go to .devkit/lib; submitit and jsonschema as wheels.
# Usage: benchmarks/gpu_h200/device_kit.sh [PYTHON_OF_THE_TARGET_VERSION]   then carry .devkit and run
# `bash .devkit/run.sh` there (device_run.sh: installs the kit with --no-index, then benchmarks.gpu_smoke).
set -euo pipefail
PY=${1:-/root/.pyenv/versions/3.12.1/bin/python}
K=.devkit; T=$(mktemp -d)
mkdir -p $K/lib $K/whl
grep -qx "/.devkit/" .git/info/exclude 2>/dev/null || echo "/.devkit/" >> .git/info/exclude
$PY -m pip wheel -q --no-deps -w $K/whl ffcv==1.0.2 assertpy==1.1 terminaltables==3.1.10
$PY -m pip download -q --no-deps --only-binary :all: -d $K/whl submitit==1.5.4 jsonschema==4.26.0 referencing \
  jsonschema-specifications rpds-py
(cd $T && unzip -q "$OLDPWD"/$K/whl/ffcv-1.0.2-*.whl 'ffcv/_libffcv*')
for l in $(ldd $T/ffcv/_libffcv*.so | awk '/=>/{print $3}'); do
  case $(basename $l) in libc.so*|libm.so*|libstdc++*|libgcc_s*|libz.so*) ;; *) cp -L $l $K/lib/;; esac
done
cp benchmarks/gpu_h200/device_run.sh $K/run.sh; git rev-parse HEAD > $K/commit.txt; rm -rf $T
du -sh $K
