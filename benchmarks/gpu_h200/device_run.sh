#!/bin/bash
# On the device machine, from the repository root: install the carried wheels (ffcv built here for
# cp312 against Debian 12's OpenCV/libjpeg-turbo, whose .so files are carried in lib/), then the GPU check.
set -u
K=$PWD/.devkit
export PYTHONUNBUFFERED=1 LD_LIBRARY_PATH=$K/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -m pip install -q --no-index --no-deps --target $K/site $K/whl/*.whl > $OUT/setup.txt 2>&1
export PYTHONPATH=$K/site:$PWD
{ echo "commit $(cat $K/commit.txt)"; nvidia-smi -L; nproc
  python3 -c "import sys,torch,torchvision,numba,numpy,submitit,jsonschema; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torchvision.__version__, numba.__version__, numpy.__version__, torch.cuda.is_available())"
  python3 -c "import barlow.ffcv_import, ffcv, ffcv.libffcv, barlow.launch, barlow.probe, barlow.pretrain; print('imports ok')"
} >> $OUT/setup.txt 2>&1 || { cat $OUT/setup.txt; exit 3; }
tail -4 $OUT/setup.txt
W=/tmp/gs; mkdir -p $W/out $W/work
timeout -k 15 -s INT ${SMOKE_S:-470} python3 -m benchmarks.gpu_smoke --out $W/out --work $W/work --keep "$@" > $OUT/console.txt 2>&1
rc=$?
echo "gpu_smoke exit $rc"
cp $W/out/gpu_smoke.json $OUT/ 2>/dev/null
(cd $W && tar czf $OUT/logs.tgz out/logs $(find work -name '*_log.err' -o -name '*_log.out' -o -name 'metrics.csv' -o -name '*.json' -size -2M) 2>/dev/null)
grep -E "^\[(PASS|FAIL|TIMEOUT|SKIP)\]" $OUT/console.txt; tail -25 $OUT/console.txt
exit $rc
