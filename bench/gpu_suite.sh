#!/usr/bin/env bash
# GPU work for one device call: install mamba-ssm, then the named phases, logs and results under $OUT.
#   bash bench/gpu_suite.sh tests lm vision
# Phases: tests and tests-train (pytest -m gpu, split to fit a device call each), decode-tests (the Triton decode and
# rollback kernels' GPU tests alone), lm / vision (joint training, 4 independent baselines, evaluation),
# eval (the shipped checkpoints), cloud (serving benchmark), router (edge worker on the GPU under Ray),
# spec-tests, spec-profile and spec (speculative decoding's GPU tests; a round's cloud time, bench/verify_profile.py;
# across tiers, bench/spec_bench.py), chunk (a round's kernels under each tiling, bench/chunk_kernels.py),
# block (nested block vs mamba-ssm Mamba2), decode (the decode step's projections, cuBLAS vs the Triton GEMV,
# bench/gemv_bench.py; CUDA-graph decoding vs mamba-ssm generation; the kernels of one decode step,
# bench/decode_profile.py), distill (the shipped LM fine-tuned with matmamba.train --distill, and its control).
# BASELINES_ONLY=1 skips the joint run; PARALLEL_BASELINES=1 trains the baselines concurrently.
# Needs .whl (the mamba-ssm sdist, grpcio/protobuf/grpcio-health-checking wheels for Python 3.12), .data
# (fashion-mnist gz files, prepared prose) and the generated proto/*_pb2*.py carried along.
set -euo pipefail
export PYTHONUNBUFFERED=1
# Keep Triton's autotuning results on disk so later processes (baselines, evals) skip re-tuning.
export TRITON_CACHE_AUTOTUNING=1
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if [ ! -d /tmp/site/mamba_ssm ]; then
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE python3 -m pip install -q --no-deps --no-build-isolation \
    --target /tmp/site .whl/mamba_ssm-2.3.2.post1.tar.gz
  # grpcio / protobuf at the versions the generated modules were made for, plus the health service
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
export MATMAMBA_FMNIST_DIR=$PWD/.data/fashion-mnist MATMAMBA_PROSE_DIR=$PWD/.data/prose
DEVICE_LINE=$(python3 -c "import torch, triton; print('device', torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)")
echo "$DEVICE_LINE"

VISION=(--d-model 192 --n-layer 6 --d-state 64 --headdim 16 --steps 1500 --batch-size 512 --lr 3e-3 --warmup 150
        --eval-every 500 --save-every 100000 --no-progress)
LM=(--d-model 256 --n-layer 6 --d-state 64 --headdim 16 --steps 800 --batch-size 32 --seq-len 256 --lr 2e-3
    --warmup 100 --eval-every 200 --save-every 100000 --vocab-size 2048 --no-progress)

# Fine-tuning the shipped LM (phase distill): a quarter of its learning rate, 600 more steps.
DISTILL=(--steps 600 --batch-size 32 --seq-len 256 --lr 5e-4 --warmup 50 --eval-every 200 --save-every 100000
         --no-progress)

run_task() {  # task, widths..., then training args after --
  local task=$1; shift
  local widths=()
  while [ "$1" != "--" ]; do widths+=("$1"); shift; done; shift
  local dir=runs/$task
  mkdir -p "$dir"
  local log=$OUT/$task.log
  echo "== $task joint $(date +%T)" | tee -a "$log"
  if [ -z "${BASELINES_ONLY:-}" ] && [ ! -f "$dir/joint/metrics.json" ]; then
    python3 -m matmamba.train "$task" --out "$dir/joint" "$@" >> "$log" 2>&1
    python3 -m matmamba.eval --checkpoint "$dir/joint" --out "$dir/eval-joint" >> "$log" 2>&1
    tar czf "$OUT/$task.tar.gz" -C runs "$task"
  fi
  for w in "${widths[@]}"; do
    echo "== $task baseline $w $(date +%T)" | tee -a "$log"
    if [ ! -f "$dir/eval-baseline-$w/eval.json" ]; then
      if [ -n "${PARALLEL_BASELINES:-}" ]; then  # accuracy only: concurrent runs distort their timings
        baseline "$task" "$w" "$dir" "$@" > "$OUT/$task-baseline-$w.log" 2>&1 &
      else
        baseline "$task" "$w" "$dir" "$@" >> "$log" 2>&1
        tar czf "$OUT/$task.tar.gz" -C runs "$task"
      fi
    fi
  done
  wait
  tar czf "$OUT/$task.tar.gz" -C runs "$task"
  [ -f "$dir/eval-joint/eval.md" ] && tail -40 "$dir/eval-joint/eval.md"
}

baseline() {  # task, width, dir, training args...: train one width alone, evaluate it, drop its weights
  local task=$1 w=$2 dir=$3; shift 3
  python3 -m matmamba.train "$task" --levels 1 --width "$w" --out "$dir/baseline-$w" "$@"
  python3 -m matmamba.eval --checkpoint "$dir/baseline-$w" --width "$w" --out "$dir/eval-baseline-$w"
  rm "$dir/baseline-$w/model.safetensors"
}

for phase in "$@"; do
  case $phase in
    # The GPU tests in two phases that each fit a 10-minute device call: on an H100 all of them took 505 s,
    # about half of it the Triton forward+backward comparisons (autotuning every shape).
    tests) { echo "$DEVICE_LINE"; python3 -m pytest -m gpu -q -k "not forward_backward" tests/test_gpu.py \
               tests/test_gpu_graphs.py tests/test_gpu_gemv.py 2>&1; } | tee "$OUT/gpu_tests.log" | tail -15 ;;
    tests-train) { echo "$DEVICE_LINE"; python3 -m pytest -m gpu -q -k forward_backward tests/test_gpu.py 2>&1; } \
                   | tee "$OUT/gpu_tests_train.log" | tail -15 ;;
    decode-tests)  # the decode step's and the rollback's Triton kernels on the GPU (a few minutes: no model training)
      { echo "$DEVICE_LINE"; python3 -m pytest -m gpu -q tests/test_gpu_gemv.py tests/test_rewind_kernel.py 2>&1; } \
        | tee "$OUT/decode_tests.log" | tail -15 ;;
    lm) run_task lm 256 128 64 32 -- "${LM[@]}" ;;
    vision) run_task vision 192 96 48 24 -- "${VISION[@]}" ;;
    eval)  # the shipped checkpoints: every level, untrained uniform widths, a Mix'n'Match sweep
      for ckpt in matmamba-vision-fmnist matmamba-lm-austen; do
        python3 -m matmamba.eval --checkpoint "checkpoints/$ckpt" --out "runs/eval-$ckpt" > "$OUT/eval-$ckpt.log" 2>&1
        cp "runs/eval-$ckpt/eval.json" "$OUT/eval-$ckpt.json"
      done ;;
    router)  # the edge worker as a GPU Ray actor: needs .raywhl carried (python -m bench.ray_wheel)
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .raywhl/*.whl
      { echo "$DEVICE_LINE"; python3 -m pytest -m gpu -q tests/test_gpu_router.py 2>&1
        python3 -m bench.router_overhead --device cuda --out "$OUT/router_overhead_gpu.json" 2>&1 | tail -6
      } | tee "$OUT/router_gpu.log" ;;
    spec-tests)  # speculative decoding's GPU tests, the short-chunk verification kernels' included
      { echo "$DEVICE_LINE"; python3 -m pytest -m gpu -q tests/test_speculative.py tests/test_short_chunk.py 2>&1; } \
        | tee "$OUT/spec_tests.log" ;;
    spec-profile)  # the rollback kernel's GPU test, then a round's cloud time, its kernels, and the cloud's GPU time
      # per token by edge level (bench/verify_profile.py: one process, no Ray)
      { echo "$DEVICE_LINE"; python3 -m pytest -m gpu -q tests/test_rewind_kernel.py 2>&1
        python3 -m bench.verify_profile --out "$OUT/verify_profile.json" 2>&1; } | tee "$OUT/verify_profile.log" ;;
    chunk)  # a verification round's kernels one by one under each tiling (bench/chunk_kernels.py)
      python3 -m bench.chunk_kernels --out "$OUT/chunk_kernels.json" > "$OUT/chunk_kernels.log" 2>&1
      grep "^|\|^verification" "$OUT/chunk_kernels.log" ;;
    spec)  # speculative decoding across tiers (cloud process + router on Ray): needs .raywhl carried, as router
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .raywhl/*.whl
      # fp32: greedy identity is checked token for token (bf16 rounding differs between a step and a chunk)
      { echo "$DEVICE_LINE"; python3 -m bench.spec_bench --device cuda --precision fp32 \
          --out "$OUT/spec_bench-cuda.json" 2>&1; } | tee "$OUT/spec_bench.log" ;;
    cloud)  # served vs bare, 1 / 4 / 8 server processes (python -m cloud --workers N) side by side; ~7 min on an
      # H100 host (16 cores: 8 workers + 6 client processes); the JSON is rewritten after each worker count, and
      # the timeout keeps the phase inside one 10-minute device call with what was measured by then
      timeout -k 30 540 python3 -m bench.cloud_bench --device cuda --workers 1,4,8 --request-sizes 1,8,64 --reps 3 \
        --served-seconds 3 --clients 256 --client-procs 6 --connections 96 --cpu-threads 1 \
        --out "$OUT/cloud_bench.json" 2>&1 | tee "$OUT/cloud_bench.log" \
        || echo "cloud_bench ended with status $? (124 = the timeout: the JSON holds the worker counts measured)" ;;
    block) python3 -m bench.block_bench --out "$OUT/block_bench.json" 2>&1 | tee "$OUT/block_bench.log" ;;
    decode) python3 -m bench.gemv_bench --out "$OUT/gemv_bench.json" > "$OUT/gemv_bench.log" 2>&1
      tail -50 "$OUT/gemv_bench.log"
      python3 -m bench.decode_bench --no-eager --out "$OUT/decode_bench.json" 2>&1 | tee "$OUT/decode_bench.log"
      python3 -m bench.decode_profile --sizes 768x24,2048x48,2560x64 --gemv-modes fused,unfused,cublas \
        --out "$OUT/decode_profile.json" > "$OUT/decode_profile.log" 2>&1
      grep "graph step" "$OUT/decode_profile.log" ;;
    scale)  # cloud replicas through routers (bench/scale_bench.py): needs .raywhl carried, as router; ~6 min on an H100
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .raywhl/*.whl
      gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); gpus=${gpus:-0}
      # one Triton cache for every process: the routers' Ray workers run with a private HOME (router/ray_setup.py)
      export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
      counts=1; for n in 2 4 8; do [ "$n" -le "$gpus" ] && counts="$counts,$n"; done
      # 2 routers: one Python router process may cap the load before one replica does (see the busy column)
      SCALE=(--device cuda --routers 2 --images-per-request 16 --client-procs 4 --clients 16 --warmup-s 5 --seconds 15)
      { echo "$DEVICE_LINE, $gpus GPU(s)"
        echo "== one-GPU stand-in: 2 replicas sharing GPU 0 against 1 $(date +%T)"
        python3 -m bench.scale_bench "${SCALE[@]}" --replicas 1,2 --replicas-per-gpu 2 \
          --out "$OUT/scale/scale-standin.json" 2>&1 || echo "scale_bench (stand-in) exited $?"
        if [ "$gpus" -ge 2 ]; then
          echo "== one replica per GPU: $counts $(date +%T)"
          python3 -m bench.scale_bench "${SCALE[@]}" --replicas "$counts" --out "$OUT/scale/scale-gpus.json" 2>&1 \
            || echo "scale_bench (per GPU) exited $?"
        fi
      } | tee "$OUT/scale.log" ;;
    distill)  # the shipped LM fine-tuned with --distill 0 (the control: more steps only), 0.5 and 0.9, side by side
      # on the GPU (small, launch-bound models: concurrent runs share it); checkpoints as tarballs under $OUT
      mkdir -p runs/distill
      for a in 0 0.5 0.9; do
        python3 -m matmamba.train lm --init checkpoints/matmamba-lm-austen --distill "$a" "${DISTILL[@]}" \
          --out "runs/distill/distill-$a" > "$OUT/distill-$a.log" 2>&1 &
      done
      wait
      for a in 0 0.5 0.9; do
        tail -1 "$OUT/distill-$a.log"
        tar czf "$OUT/distill-$a.tar.gz" -C runs/distill "distill-$a"
      done ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
done
