#!/usr/bin/env bash
# One H200, under 8 minutes: tests/gpu, then benchmarks/stream.py on the full preset at 1280x704
# bf16 (eager, compiled, CUDA graphs, FP8; backbone-only and end to end with each decoder), and
# one table next to the paper's 23.8 FPS (backbone-only, one H200, 720p).
#
#   bash benchmarks/gpu.sh [--chunks N] [--warmup N] [--checkpoint DIR] [--skip-tests] [--out DIR]
#
# Exit status: 0 ok, 2 bad option, 3 no CUDA device, 1 a step failed (the table marks it).
set -uo pipefail
cd "$(dirname "$0")/.."

CHUNKS=6 WARMUP=2 CHECKPOINT="" SKIP_TESTS=0 OUT="${OUT:-/tmp/fashionchameleon-gpu}"
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --chunks) CHUNKS="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --checkpoint) CHECKPOINT="$2"; shift 2 ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu.sh needs a CUDA device (torch.cuda.is_available() is False here); nothing was run" >&2
  exit 3
fi
mkdir -p "$OUT"
status=0
if [[ $SKIP_TESTS == 0 ]]; then
  timeout 120 "$PY" -m pytest -q -x tests/gpu 2>&1 | tail -5 || status=1
fi
SRC=(--preset wan2.2-ti2v-5b)
[[ -n "$CHECKPOINT" ]] && SRC=(--checkpoint "$CHECKPOINT")
COMMON=("${SRC[@]}" --device cuda --dtype bfloat16 --height 704 --width 1280 --chunks "$CHUNKS" --warmup "$WARMUP" --json)
run() {  # name, extra args...; each run has its own time limit so the whole script stays < 8 min
  local name="$1"; shift
  if timeout 70 "$PY" benchmarks/stream.py "${COMMON[@]}" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"; then
    tail -n 1 "$OUT/$name.json" > "$OUT/$name.last"
  else
    echo "gpu.sh: $name failed (see $OUT/$name.log)" >&2; : > "$OUT/$name.last"; status=1
  fi
}
run eager --no-compiled
run compiled --compile --no-hot-path
run cuda_graphs --compile --cuda-graphs --no-hot-path
run fp8 --fp8 --compile --no-hot-path
[[ -z "$CHECKPOINT" || -d "$CHECKPOINT/fast_decoder" ]] && run fast_decoder --decoder fast --no-hot-path
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'run':<14}{'backbone FPS':>14}{'end-to-end FPS':>16}{'chunk p50 ms':>14}{'decode p50 ms':>15}  note")
print(f"{'paper':<14}{23.8:>14.1f}{'-':>16}{'-':>14}{'-':>15}  FashionChameleon, one H200, 720p, backbone only")
for name in ("eager", "compiled", "cuda_graphs", "fp8", "fast_decoder"):
    f = out / f"{name}.last"
    if not f.exists():
        continue
    text = f.read_text().strip()
    if not text:
        print(f"{name:<14}{'failed':>14}"); continue
    r = json.loads(text)
    note = ""
    if r.get("cache_overhead_ratio") is not None:
        note = f"cache overhead {r['cache_overhead_ratio']:.3f}, vs diffusers {r['forward_vs_diffusers_ratio']:.3f}"
    if r.get("decode_speedup") is not None:
        note = f"fast decoder {r['decode_speedup']:.1f}x, {r['decode_psnr_db']:.1f} dB"
    print(f"{name:<14}{r['backbone_fps']:>14.2f}{r['end_to_end_fps']:>16.2f}"
          f"{r['generate_p50_seconds'] * 1e3:>14.1f}{r['decode_p50_seconds'] * 1e3:>15.1f}  {note}")
PYEOF
exit $status
