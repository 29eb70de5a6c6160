#!/usr/bin/env bash
# The GPU check in one command: parity with the reference cases on the GPU, then the TI-step and sampling benches
# (ours vs the original's way) on the LDM-1.4B-shaped config (256 px, batch 4, bf16), SD 1.x 512 px, SD 2.x 768-v
# and SDXL 1024 px where configs/stable-diffusion/sdxl-finetune.yaml exists, printed as one table.
#
#   bash bench/gpu_check.sh           # CUDA; under 8 min on one H100 (estimate; no GPU run yet)
#   bash bench/gpu_check.sh --smoke   # CPU, tiny configs, a couple of steps each (CI runs it)
#
# Installs nothing: it runs .venv/bin/python when there is one (bash install.sh; on a machine that already has a
# CUDA torch, TORCH_SPEC=skip bash install.sh), else $PYTHON, else python3. With $OUT set, the output is also
# written to $OUT/gpu_check.txt. The benches stop after GPU_CHECK_LIMIT seconds (540; rows done so far are
# printed as they finish). Exit status: 0, 1 when a parity case is off or a bench failed, 2 on bad usage.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

smoke=0
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option '$arg': use no option (CUDA) or --smoke (CPU, tiny configs)" >&2; exit 2 ;;
  esac
done
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=${PYTHON:-python3}; fi
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

report=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && report="$OUT/gpu_check.txt"; fi

run() {
  local device=cuda bench_args=(--device cuda) status=0
  if [ "$smoke" = 1 ]; then device=cpu; bench_args=(--smoke); fi
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$py" - "$device" <<'PY' || return 2
import sys

import torch

device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {device}", end="")
if device == "cuda":
    if not torch.cuda.is_available():
        print("\nerror: no CUDA device visible to torch: run on a GPU machine with a CUDA build of torch, "
              "or use --smoke for the CPU check", file=sys.stderr)
        sys.exit(2)
    print(f": {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB",
          end="")
print()
PY
  echo
  "$py" bench/parity_cases.py --device "$device" || status=1
  echo
  timeout "${GPU_CHECK_LIMIT:-540}" "$py" bench/gpu_check.py "${bench_args[@]}" || status=1
  echo
  echo "total ${SECONDS}s"
  return $status
}

run 2>&1 | tee "$report"
exit "${PIPESTATUS[0]}"
