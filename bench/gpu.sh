#!/usr/bin/env bash
# Every GPU measurement of maskmint in one call, most important first, so a run cut off at
# its limit still returns what it measured. On a machine with torch and nothing else of
# maskmint's stack: the wheels `bench/gpu-wheels.sh` puts in .whl/ travel beside it. Last,
# Flux-schnell with int8 weights (model.quantize) and under model.offload model / sequential,
# for their peak memory; OUT/offload-identity.json says whether offload left c's images and
# heat maps as the plain run's (same random weights, same seeds).
#
#   bash bench/gpu.sh OUT                 # CUDA: the real architectures, random weights
#   DEVICE=cpu bash bench/gpu.sh OUT      # the same steps on the tiny models (a dry run, in CI)
#
# Writes OUT/NAME.json per step (bench/throughput.py's record), OUT/gpu.log (everything
# printed) and OUT/steps.json (each step's exit code and seconds). BUDGET_S (default 450)
# bounds the whole call: a step is skipped once less than its own limit is left.
set -u
out=${1:-${OUT:-gpu-out}}
device=${DEVICE:-cuda}
budget=${BUDGET_S:-450}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
log="$out/gpu.log"
python=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/maskmint-site .whl/*.whl \
    >>"$log" 2>&1 || { echo "wheels did not install (see $log)"; exit 2; }
  export PYTHONPATH=/tmp/maskmint-site
fi
# the checkout is the `maskmint` package: a link named so makes it importable without installing
source_root=$(mktemp -d /tmp/maskmint-src.XXXXXX)
ln -s "$PWD" "$source_root/maskmint"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$source_root:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
start=$(date +%s)
echo "{" >"$out/steps.json"
first=1

step() {  # step NAME LIMIT_S ARGS...: one bench.throughput run, bounded
  local name=$1 limit=$2 began rc
  shift 2
  local left=$((budget - ($(date +%s) - start)))
  if [ "$left" -lt "$limit" ]; then
    echo "== $name skipped: $left s left of the budget, it may take $limit" | tee -a "$log"
    rc=skipped
  else
    echo "== $name: python -m bench.throughput $* --json $out/$name.json" | tee -a "$log"
    began=$(date +%s)
    timeout "$limit" $python -m bench.throughput "$@" --json "$out/$name.json" >>"$log" 2>&1
    rc=$?
    echo "== $name exit $rc after $(($(date +%s) - began)) s" | tee -a "$log"
  fi
  [ $first = 1 ] || echo "," >>"$out/steps.json"
  first=0
  echo "\"$name\": {\"exit\": \"$rc\", \"after_s\": $(($(date +%s) - start))}" >>"$out/steps.json"
}

{ date -u; uname -a; $python -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } >>"$log" 2>&1

if [ "$device" = cuda ]; then
  peak="--peak-tflops 989"  # H100/H200 dense bf16/fp16 peak
  step sd15 120 --model sd15 --device cuda --dtype fp16 --batch 8 --steps 30 --repeats 2 $peak
  step sd15-compile 180 --model sd15 --device cuda --dtype fp16 --batch 8 --steps 30 --repeats 2 --compile $peak
  step sdxl 150 --model sdxl --device cuda --dtype fp16 --batch 4 --steps 20 --repeats 2 $peak
  step flux-schnell-cross 240 --model flux-schnell --device cuda --dtype bf16 --batch 2 --steps 4 --repeats 2 $peak
  step flux-schnell-concept 150 --model flux-schnell --device cuda --dtype bf16 --batch 2 --steps 4 --repeats 2 \
    --recipe concept_attention $peak
  step flux-schnell-int8 240 --model flux-schnell --device cuda --dtype bf16 --batch 2 --steps 4 --repeats 2 \
    --quantize int8 $peak
  step flux-schnell-offload-model 240 --model flux-schnell --device cuda --dtype bf16 --batch 2 --steps 4 --repeats 1 \
    --offload model $peak
  step flux-schnell-offload-sequential 300 --model flux-schnell --device cuda --dtype bf16 --batch 2 --steps 4 \
    --repeats 1 --offload sequential $peak
else
  step sd15 120 --model tiny --device cpu --batch 2 --steps 2 --repeats 1
  step sd15-compile 120 --model tiny --device cpu --batch 2 --steps 2 --repeats 1 --compile --compile-backend eager
  step sdxl 120 --model tiny-sdxl --device cpu --batch 2 --steps 2 --repeats 1
  step flux-schnell-cross 120 --model tiny-flux --device cpu --batch 2 --steps 2 --repeats 1
  step flux-schnell-concept 120 --model tiny-flux --device cpu --batch 2 --steps 2 --repeats 1 --recipe concept_attention
  step flux-schnell-int8 120 --model tiny-flux --device cpu --batch 2 --steps 2 --repeats 1 --quantize int8
  # sequential offload is refused on the CPU (nothing to save there): the dry run takes model only
  step flux-schnell-offload-model 120 --model tiny-flux --device cpu --batch 2 --steps 2 --repeats 1 --offload model
fi
echo "}" >>"$out/steps.json"
# model.offload must leave images and heat maps as they are: variant c's digest beside the plain run's
$python - "$out" <<'PY' 2>&1 | tee -a "$log"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def digest(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()).get("c_sha256") if path.is_file() else None
plain = digest("flux-schnell-cross")
found = {name: digest(name) for name in ("flux-schnell-offload-model", "flux-schnell-offload-sequential")}
record = {name: None if d is None or plain is None else d == plain for name, d in found.items()}
(out / "offload-identity.json").write_text(json.dumps(record, indent=1))
print("offload: c's images and heat maps equal to the plain run's:", record)
PY
echo "done in $(($(date +%s) - start)) s: $out" | tee -a "$log"
