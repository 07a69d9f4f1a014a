#!/usr/bin/env bash
# The GPU benchmark of issue 6, in one call of the device tool. Results go to $OUT:
# <stage>.json (all numbers) and <stage>.log (the rich tables); the targets table prints last.
#
#   scripts/gpu_bench.sh smoke    fp32 correctness check + a short llama3-8b run (B=1)
#   scripts/gpu_bench.sh dev      fp32 checks (three families, Aligner, sampling); llama3 at B=1
#                                 with transformers and a profile
#   scripts/gpu_bench.sh main     fp32 correctness check + the llama3 pair below
#   scripts/gpu_bench.sh final    olmo2 pair at batches 1, 32; llama3 at batch 1; kernel profiles
#   scripts/gpu_bench.sh llama3   llama3-8b + llama3.2-1b, batches 1 and 32, with transformers
#   scripts/gpu_bench.sh olmo2    olmo2-13b + olmo2-1b, the same
#   scripts/gpu_bench.sh qwen3    qwen3-14b + qwen3-1.7b, the same
#   scripts/gpu_bench.sh olmo2_b8 a pair at batch 8 (also llama3_b8, qwen3_b8)
#   scripts/gpu_bench.sh sampling the check (one family), decision timings, llama3 B=1 short
#   scripts/gpu_bench.sh b8       olmo2_b8 then qwen3_b8
#   scripts/gpu_bench.sh llama3_all  llama3 at batches 1, 8, 32 with kad bench's float32 check
#   scripts/gpu_bench.sh rounds   the float32 check, then llama3 at batches 1, 32 without peers
set -euo pipefail
stage=${1:-smoke}
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers",
  transformers.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv,noheader || true

preset() {  # the base preset of a family
  case $1 in llama3) echo llama3-8b ;; olmo2) echo olmo2-13b ;; qwen3) echo qwen3-14b ;; esac
}

bench() {  # bench NAME ARGS...: `kad bench ARGS --out $OUT/NAME.json`, tables to NAME.log
  local name=$1
  shift
  python3 -c 'import sys, typer; from kad.bench import bench_command
sys.argv[0] = "kad bench"; typer.run(bench_command)' "$@" --out "$OUT/$name.json" 2>&1 |
    tee "$OUT/$name.log"
}

case $stage in
  smoke)
    python3 scripts/gpu_check.py llama3.2-1b 2>&1 | tee "$OUT/check.log"
    bench smoke --random-init llama3-8b --batch 1 --new-tokens 64 --gammas 1,4 \
      --assisted-gammas 2 --repeats 1
    ;;
  dev)  # correctness of every family, of Aligner's own choice and of sampling; llama3 at B=1
    python3 scripts/gpu_check.py llama3.2-1b qwen3-1.7b olmo2-1b 2>&1 | tee "$OUT/check.log" ||
      echo "gpu_check.py failed; the benchmark runs anyway"
    bench llama3_b1 --random-init llama3-8b --batch 1 --repeats 3 --assisted-gammas 2,4 --profile
    ;;
  main)  # the fp32 check, then the llama3 pair
    python3 scripts/gpu_check.py llama3.2-1b 2>&1 | tee "$OUT/check.log"
    bench llama3 --random-init llama3-8b --batch 1,8,32 --repeats "${REPEATS:-2}" \
      --assisted-gammas "${ASSISTED:-2,4}"
    ;;
  final)  # the olmo2 pair (batches 1 and 32), then llama3 at batch 1 again, with profiles
    bench olmo2 --random-init olmo2-13b --batch 1,32 --repeats 2 --assisted-gammas 4 --profile
    bench llama3_b1 --random-init llama3-8b --batch 1 --repeats 3 --assisted-gammas 4 \
      --no-transformers --no-check --profile
    ;;
  llama3 | olmo2 | qwen3)  # a pair at batches 1 and 32 with transformers and profiles
    bench "$stage" --random-init "$(preset "$stage")" --batch 1,32 --repeats "${REPEATS:-2}" \
      --assisted-gammas "${ASSISTED:-4}" --profile
    ;;
  llama3_b8 | olmo2_b8 | qwen3_b8)  # batch 8
    bench "$stage" --random-init "$(preset "${stage%_b8}")" --batch 8 --repeats 2 \
      --gammas 1,2,3,4 --no-transformers --no-check
    ;;
  sampling)  # sampled rounds: the check, where a decision's time goes, llama3 at batch 1
    python3 scripts/gpu_check.py llama3.2-1b 2>&1 | tee "$OUT/check.log" ||
      echo "gpu_check.py failed; the benchmark runs anyway"
    python3 scripts/gpu_sampling.py 2>&1 | tee "$OUT/sampling.log" || echo "gpu_sampling.py failed"
    bench llama3_b1 --random-init llama3-8b --batch 1 --repeats 3 --gammas 4 --assisted-gammas 4 \
      --no-transformers --no-check
    ;;
  llama3_all)  # the llama pair at batches 1, 8, 32 in one run, with the float32 check (no transformers)
    bench llama3_all --random-init llama3-8b --batch 1,8,32 --repeats 2 --gammas 1,2,3,4 \
      --assisted-gammas 4 --no-transformers
    ;;
  rounds)  # rounds keyed by their Work (2026-12-02): the check, then the llama pair without peers
    timeout 240 python3 scripts/gpu_check.py llama3.2-1b 2>&1 | tee "$OUT/check.log" ||
      echo "gpu_check.py failed; the benchmark runs anyway"
    bench llama3_rounds --random-init llama3-8b --batch 1,32 --repeats 2 --gammas 2-5 \
      --no-transformers --no-check
    ;;
  b8)  # the olmo2 and qwen3 pairs at batch 8, in one call
    for family in olmo2 qwen3; do
      bench "${family}_b8" --random-init "$(preset $family)" --batch 8 --repeats 2 \
        --gammas 1,2,3,4 --no-transformers --no-check
    done
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
