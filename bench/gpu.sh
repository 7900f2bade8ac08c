#!/usr/bin/env bash
# The trainer on a lent GPU machine (the device tool), in one command that ends in under 8 minutes (its steps' limits
# add up to 395 s; about 5 expected) and writes its figures to $OUT (gpu.txt, and a JSON file a run). Run it with
# run(command="bench/gpu.sh", carry=[".whl"], timeout_s=480), which leaves a 15-minute lease room for one rerun.
#
#   bench/gpu.sh fetch      here, once: the wheels that machine lacks into .whl/ (git-ignored; the device tool
#                           carries it: run(..., carry=[".whl"]))
#   bench/gpu.sh            there: installs .whl/ into /tmp/site, then
#                             1. bench/gpu_checks.py: packed rows (varlen) against dense masks and examples alone,
#                                attention kernels and the loss's memory, side by side;
#                             2. bench/trainer.py at 2,048 tokens with 4-bit NF4 on a Llama 3.2 1B shape and a
#                                Llama 3.1 8B shape (random weights built there): ours against Hugging Face's QLoRA
#                                recipe padded and with padding-free flattening (and FlexAttention on the 1B):
#                                tokens/s, peak memory against the estimator, MFU;
#                             3. the real trainer (`python -m worker.trainer`) while another process holds all but
#                                3 GiB of the GPU, as a game would: torch.cuda.OutOfMemoryError, and the hint the
#                                customer reads.
#   bench/gpu.sh --dry-run  here, on the CPU: the same steps on small shapes, to find the script's mistakes before
#                           spending device time.
#
# That machine has torch, transformers and peft but not bitsandbytes or pydantic, and no network: `fetch` downloads
# bitsandbytes (only its CUDA 13 and CPU libraries kept, to fit the 64 MiB a call carries), pydantic and what it
# needs, and the trainer's pinned transformers and peft, for Python 3.12 on x86-64.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

WHEELS=(bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0)

fetch() {
  rm -rf .whl && mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for wheel in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$wheel" || { echo "fetch: $wheel failed" >&2; return 1; }
  done
  # bitsandbytes ships a library for every CUDA and ROCm release (43 MB): keep CUDA 13's and the CPU's.
  python3 - <<'EOF'
import pathlib, zipfile
for wheel in pathlib.Path(".whl").glob("bitsandbytes-*.whl"):
    trimmed = wheel.with_suffix(".trim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = item.filename
            if name.endswith(".so") and not any(k in name for k in ("cuda130", "cuda132", "_cpu")):
                continue
            dst.writestr(item, src.read(name))
    trimmed.replace(wheel)
EOF
  du -sh .whl
}

if [[ "${1:-}" == "fetch" ]]; then
  fetch
  exit $?
fi

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$ROOT/.gpu-out}
mkdir -p "$OUT"
LOG="$OUT/gpu.txt"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }
began=$SECONDS
step() {  # seconds, name, command...: bounded, its output kept
  local limit=$1 name=$2; shift 2
  say ""
  say "== $name (at $((SECONDS - began)) s, limit $limit s)"
  timeout --kill-after=10 "$limit" "$@" 2>"$OUT/$name.err" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && { say "$name: exit $rc"; tail -5 "$OUT/$name.err" | tee -a "$LOG"; }
  return 0
}

if [[ $DRY -eq 1 ]]; then
  PY=${PY:-$ROOT/.venv/bin/python}
  SMALL=small
  BIG=small
  LEN=256
  EXAMPLES_1B=48
  EXAMPLES_8B=24
  MEAN_WORDS=40
  BATCH=2
  BATCH_8B=2
  OOM_ROWS=256  # a micro-batch of 256 rows under a 3 GB cap
else
  PY=python3
  if [[ -d .whl ]]; then  # wheels are zip files: unpacked as they are, nothing compiled, nothing fetched
    mkdir -p /tmp/site
    for wheel in .whl/*.whl; do python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" "$wheel"; done
    export PYTHONPATH=/tmp/site
  fi
  SMALL=llama-1b
  BIG=llama-8b
  LEN=2048
  EXAMPLES_1B=200
  EXAMPLES_8B=64
  MEAN_WORDS=220
  BATCH=4
  BATCH_8B=2  # more, shorter steps: tokens/s is measured past the first
  OOM_ROWS=16  # 16 rows of 2,048 tokens where 3 GiB are left
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

say "== setup"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$LOG"
$PY - <<'EOF' 2>&1 | grep -v kernels-community | tee -a "$LOG"
import importlib
for name in ("torch", "transformers", "peft", "bitsandbytes", "pydantic", "accelerate", "safetensors"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name} MISSING: {exc}")
EOF

step 45 checks $PY bench/gpu_checks.py --json "$OUT/checks.json"

MODELS=${TMPDIR:-/tmp}/tunegrid-gpu-models
mkdir -p "$MODELS"
step 30 build-small $PY bench/trainer.py --shape "$SMALL" --build "$MODELS/$SMALL"
step 75 bench-small $PY bench/trainer.py --shape "$SMALL" --model-dir "$MODELS/$SMALL" --max-seq-len "$LEN" \
  --examples "$EXAMPLES_1B" --mean-words "$MEAN_WORDS" --batch-size "$BATCH" \
  --runs ours,flattening,padded$([[ $DRY -eq 0 ]] && echo ,flex) --budget-s 70 --json "$OUT/$SMALL.json"
if [[ $DRY -eq 0 ]]; then
  step 75 build-big $PY bench/trainer.py --shape "$BIG" --build "$MODELS/$BIG"
fi
step 130 bench-big $PY bench/trainer.py --shape "$BIG" --model-dir "$MODELS/$BIG" --max-seq-len "$LEN" \
  --examples "$EXAMPLES_8B" --mean-words "$MEAN_WORDS" --batch-size "$BATCH_8B" --runs ours,flattening,padded \
  --budget-s 125 --json "$OUT/$BIG.json"

# 3. Out of memory: the real trainer, as the agent starts it, beside a process holding the GPU's memory.
OOM_JOB=$(mktemp -d)
$PY - "$OOM_JOB" "$MODELS/$SMALL" "$LEN" "$OOM_ROWS" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
from bench.trainer import mixed_length_chat
from shared.jobspec import JobSpec
job, model_dir, length, rows = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
examples = mixed_length_chat(rows, mean_words=length)  # long examples: full rows
(job / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in examples))
spec = JobSpec(job_id="oom", base_model="tunegrid/tiny-llama", model_dir=model_dir, max_seq_len=length,
               hyperparameters={"batch_size": rows, "n_epochs": 1}, validation_fraction=0.0)
(job / "spec.json").write_text(spec.model_dump_json())
EOF
if [[ $DRY -eq 0 ]]; then
  $PY -c "
import time, torch
free, _ = torch.cuda.mem_get_info()
held = torch.empty(free - 3 * 2**30, dtype=torch.uint8, device='cuda')
open('/tmp/gpu-held', 'w').write(str(held.numel()))
time.sleep(120)" &
  HOLDER=$!
  for _ in $(seq 1 60); do [[ -s /tmp/gpu-held ]] && break; sleep 0.5; done
  step 40 out-of-memory $PY -m worker.trainer --job "$OOM_JOB"
  kill $HOLDER 2>/dev/null; rm -f /tmp/gpu-held
else  # the CPU's allocator, capped: the same step, the same hint
  step 40 out-of-memory bash -c "ulimit -v 3000000; exec $PY -m worker.trainer --job '$OOM_JOB'"
fi
say "trainer's last line: $(tail -1 "$OOM_JOB/out/progress.jsonl" 2>/dev/null)"
say ""
say "== done in $((SECONDS - began)) s"
