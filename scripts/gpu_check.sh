#!/usr/bin/env bash
# One GPU check, ready to run (issue 21): everything creditflow does on CUDA, in at most ~8 minutes
# on one GPU, into one folder of results.
#
#   bash scripts/gpu_check.sh [OUT]        # OUT: default gpu-check-<date>
#
# On a machine without CUDA it runs the CPU part (the same commands on --device cpu, short) and
# says which parts need a GPU. Each part's output goes to OUT/<part>.log; a part that fails is
# reported and the rest still run; the exit status is the number of failed parts.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
cuda=$(python -c "import torch; print(int(torch.cuda.is_available()))")
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
python - > "$out/device.txt" <<'PY'
import platform, torch
print("torch", torch.__version__, "python", platform.python_version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory // 2**20, "MiB")
PY
cat "$out/device.txt"
failed=0
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log, report
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  if timeout "$limit" "$@" > "$out/$name.log" 2>&1; then
    echo "ok    $name ($((SECONDS - start)) s)"
  else
    echo "FAIL  $name ($((SECONDS - start)) s, exit $?): see $out/$name.log"
    failed=$((failed + 1))
  fi
}
if [ "$cuda" = 1 ]; then
  dev=cuda
  part cuda-tests 150 python -m pytest -q tests/cuda tests/precision tests/compile tests/diagnostics/test_memory.py tests/test_devices.py
  part step-time 120 python benchmarks/step_time.py --device cuda --rules bp,fa,dfa,las,asap --models mlp,conv3 --out "$out"
  part compile-precision 150 python benchmarks/compile_precision.py --device cuda --model conv3 --out "$out"
  part memory 60 creditflow memory --device cuda --model resnet18 --rules bp,fa,dfa,asap,asap:k=4 --out "$out/memory"
else
  dev=cpu
  echo "no CUDA here: the GPU parts (CUDA tests, step times and compile/bf16 on cuda, memory --device cuda," \
       "DDP over GPUs, NCCL) need a GPU; running the CPU part"
  part cpu-tests 300 python -m pytest -q -x tests/precision tests/compile tests/test_devices.py
  part compile-precision 300 python benchmarks/compile_precision.py --device cpu --rules bp,dfa --rounds 3 --steps 3 --out "$out"
fi
common=(--model mlp:784-256-256-10 --epochs 1 --max-steps-per-epoch 50 --device "$dev" --quiet --overwrite)
part train-bf16-compile 240 creditflow train --rule dfa --precision bf16 --compile --out "$out/runs/bf16-compile" "${common[@]}"
if [ "$cuda" = 1 ]; then
  part train-fp16 120 creditflow train --rule las --precision fp16 --out "$out/runs/fp16" "${common[@]}"
fi
backend=gloo
[ "$cuda" = 1 ] && [ "$gpus" -ge 2 ] && backend=nccl
part ddp-2-ranks 180 creditflow train --rule dfa --parallel ddp --nproc 2 --backend "$backend" --out "$out/runs/ddp" "${common[@]}"
part pipeline-2-stages 180 creditflow train --rule dfa --parallel pipeline --stages 2 --out "$out/runs/pipeline" "${common[@]}"
echo "results in $out ($failed part(s) failed)"
exit "$failed"
