#!/usr/bin/env bash
# One call on a fresh NVIDIA GPU machine: sdrt's GPU tests, then the full-size random SD 1.5 built, exported (fp32,
# then `sdrt optimize` -> fused fp16; and the plain fp16 export) and every runtime measured against diffusers, with
# image parity against diffusers fp32 and per-graph errors against PyTorch fp32. Everything lands in one folder:
#   env.json (machine, versions, providers), pytest.xml, gpu_check.json/.md/.png (the bench), summary.md, logs/.
#
# usage, from anywhere:  benchmarks/gpu_check.sh [--out DIR] [--site DIR] [--budget SECONDS] [--skip-tests]
#                                                [--model NAME] [--cpu-smoke] [--dry-run]
#   --out DIR     the result folder (default: $OUT if set, else ./gpu-check-<date>)
#   --site DIR    packages unpacked by ../shared/tools/gpu-payload (onnxruntime-gpu, diffusers; default /tmp/site
#                 when it exists), put first on PYTHONPATH
#   --budget S    wall-clock seconds for the whole check (default 480: 8 minutes); each stage gets what is left
#   --model NAME  the bench's model case (default sd15; sdxl, sd35m: SD 3.5 Medium, flux-dev: FLUX.1 dev; with
#                 --cpu-smoke small, small-sd3 or small-flux; src/sdrt/bench/cases.py)
#   --cpu-smoke   the same stages on the CPU with tiny models (the CPU provider, PyTorch on the CPU): tests the script
#   --dry-run     write env.json and the plan (plan.txt) only
# Python: $PYTHON, else /opt/torch/.venv/bin/python3 when present (the GPU machine's), else python3.
# A copy of the repository without .git: SDRT_COMMIT=<commit> names the sdrt version measured.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-}
site=""
budget=480
skip_tests=0
model=""
smoke=0
dry=0
die() { echo "gpu_check.sh: $1" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || die "--out needs a folder"; out=$2; shift 2 ;;
    --site) [ $# -ge 2 ] || die "--site needs a folder"; site=$2; shift 2 ;;
    --budget) [ $# -ge 2 ] || die "--budget needs seconds"; budget=$2; shift 2 ;;
    --skip-tests) skip_tests=1; shift ;;
    --model) [ $# -ge 2 ] || die "--model needs a case name"; model=$2; shift 2 ;;
    --cpu-smoke) smoke=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (allowed: --out DIR, --site DIR, --budget SECONDS, --skip-tests, --model NAME, --cpu-smoke, --dry-run)" ;;
  esac
done
case "$budget" in ''|*[!0-9]*) die "--budget: got '$budget'; allowed: a positive whole number of seconds" ;; esac
[ "$budget" -gt 0 ] || die "--budget: got '$budget'; allowed: a positive whole number of seconds"
[ -n "$site" ] || { [ -d /tmp/site ] && site=/tmp/site; }
[ -z "$site" ] || [ -d "$site" ] || die "--site: '$site' is not a folder (unpack ../shared/tools/gpu-payload there)"
out=${out:-$PWD/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out/logs" || die "--out: cannot create '$out'"
out=$(cd "$out" && pwd)
python=${PYTHON:-}
[ -n "$python" ] || { [ -x /opt/torch/.venv/bin/python3 ] && python=/opt/torch/.venv/bin/python3; } || true
python=${python:-python3}

export PYTHONPATH="${site:+$site:}$repo/src${PYTHONPATH:+:$PYTHONPATH}"
# CUDA 13 / cuDNN 9 libraries that onnxruntime-gpu loads come with torch's wheels (../shared/GPU.md)
nvlibs=$("$python" -c 'import site, sys; print("\n".join(site.getsitepackages()))' 2>/dev/null |
         while read -r d; do [ -d "$d/nvidia" ] && find "$d/nvidia" -name 'lib*.so*' -printf '%h\n'; done | sort -u | paste -sd:)
export LD_LIBRARY_PATH="${nvlibs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMP_WAIT_POLICY=PASSIVE
work=${SDRT_CHECK_WORKDIR:-/tmp/sdrt-gpu-check}
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }

if [ "$smoke" = 1 ]; then
  bench_args=(--cpu-smoke --model "${model:-small}" --size 64 --steps 2 --runs 1 --batches 1,2)
  pytest_args=(-m gpu tests/test_gpu_fast_path.py)
else
  bench_args=(--device gpu --model "${model:-sd15}" --size 512 --steps 50 --runs 2 --batches 1,4
              --runtimes diffusers_fp32,diffusers,sdrt_cuda_static,sdrt_cuda_fused,sdrt_cuda,diffusers_compile)
  pytest_args=(-m gpu tests/test_gpu.py tests/test_gpu_fast_path.py tests/test_seeds.py tests/test_lora_fused.py)
fi
bench_args+=(--workdir "$work" --output "$out/gpu_check.json")

"$python" - "$out/env.json" "$smoke" <<'PY' > "$out/logs/env.log" 2>&1
import json, platform, subprocess, sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({e})"
try:
    import onnxruntime
    providers = onnxruntime.get_available_providers()
except Exception as e:  # a broken onnxruntime install is a finding too
    providers = [f"onnxruntime failed to import: {e}"]
from sdrt.bench.machine import sdrt_version
env = {"python": sys.executable, "python_version": platform.python_version(), "sdrt": sdrt_version(),
       "cpu_smoke": sys.argv[2] == "1", "onnxruntime_providers": providers,
       "versions": {n: version(n) for n in ("onnxruntime", "onnxruntime-gpu", "torch", "diffusers", "transformers",
                                            "onnx", "numpy", "nvidia-ml-py")},
       "nvidia_smi": run("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")}
open(sys.argv[1], "w").write(json.dumps(env, indent=2) + "\n")
print(json.dumps(env, indent=2))
PY
env_rc=$?
{
  echo "python: $python"
  echo "PYTHONPATH=$PYTHONPATH"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "1. cd $repo && $python -m pytest -q ${pytest_args[*]} --junitxml $out/pytest.xml"
  echo "2. cd $repo && $python -m sdrt.bench ${bench_args[*]} --stage-timeout <seconds left>"
} > "$out/plan.txt"
if [ "$dry" = 1 ]; then
  echo "gpu_check.sh: dry run: $out/env.json (exit $env_rc) and $out/plan.txt written"
  exit "$env_rc"
fi

summary=("| step | exit | seconds |" "|---|---|---|")
step() {  # step NAME LIMIT_S LOG CMD...: run CMD from the repository root with a time limit, record its exit status
  local name=$1 limit=$2 logfile=$3; shift 3
  local t0 rc
  t0=$(date +%s)
  if [ "$limit" -le 10 ]; then
    echo "gpu_check.sh: no time left for $name" | tee -a "$out/logs/$logfile"; rc=124
  else
    (cd "$repo" && timeout --kill-after=10 "$limit" "$@") > "$out/logs/$logfile" 2>&1; rc=$?
  fi
  summary+=("| $name | $rc | $(( $(date +%s) - t0 )) |")
  echo "gpu_check.sh: $name: exit $rc ($(( $(date +%s) - t0 )) s, log: $out/logs/$logfile)"
}
if [ "$skip_tests" = 0 ]; then
  step "pytest -m gpu" $(( $(left) < 150 ? $(left) : 150 )) pytest.log \
    "$python" -m pytest -q -p no:cacheprovider "${pytest_args[@]}" --junitxml "$out/pytest.xml"
fi
limit=$(left)
step "sdrt bench" "$limit" bench.log "$python" -m sdrt.bench "${bench_args[@]}" --stage-timeout $(( limit / 3 ))
{
  echo "# sdrt GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "sdrt $(grep -o '"sdrt": "[^"]*"' "$out/env.json" | head -1 | cut -d'"' -f4); $(tr -d '\n' < "$out/env.json" | grep -o '"nvidia_smi": "[^"]*"' || true)"
  echo
  printf '%s\n' "${summary[@]}"
  echo
  [ -f "$out/gpu_check.md" ] && cat "$out/gpu_check.md"
} > "$out/summary.md"
cp -r "$work"/*/jobs "$out/logs/" 2>/dev/null || true
echo "gpu_check.sh: results in $out (summary.md, gpu_check.json/.md/.png, env.json, pytest.xml, logs/)"
[ -f "$out/gpu_check.json" ]
