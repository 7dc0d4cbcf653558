#!/usr/bin/env bash
# The checks owed to a GPU, in stages that each fit one device call (10 minutes). On the lent machine
# (python3 with torch + CUDA, transformers, accelerate, safetensors; no hydra/omegaconf/optuna):
#
#   here:    ../shared/tools/device-wheels.sh        # hydra-core, omegaconf, optuna, ... into .whl/
#   device:  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
#              .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_suite.sh STAGE
#            (name .whl in the run's carry list)
#
# Stages: parity | bench | predict | sim | compare | tune | attention | owed. Run documents go to results/gpu/
# (or $DEST) and are copied to $OUT when set (the device tool brings $OUT back); commit them with the device
# recorded (it is, in each document's environment block).
set -euo pipefail
stages="parity|bench|predict|sim|compare|tune|attention|owed"
stage=${1:-}
# A stage this script does not have is refused before anything is created (it made results/gpu first).
if [[ ! "|$stages|" == *"|$stage|"* ]]; then
  echo "gpu_suite.sh: stage '${stage}' unknown; give one of $stages" >&2
  exit 2
fi
cd "$(dirname "$0")/.."   # paths below are the repository's, whatever the caller's working folder
dest=${DEST:-results/gpu}
mkdir -p "$dest"
export MOE_LIGHTNING_CACHE=${MOE_LIGHTNING_CACHE:-/tmp/moe-lightning-cache} PYTHONUNBUFFERED=1
ml() { python3 -m moe_lightning.cli overwrite=true "$@"; }   # a rerun of a stage replaces its documents
# Mixtral-8x7B shapes with random weights on a 16 GiB GPU (the paper's T4), 15 GiB of it planned: the engine caps
# the allocator at 16 GiB, and the rest is headroom for cuBLAS's workspaces and caching slack.
LAYERS=${LAYERS:-16}
BUDGET=(hardware=h100 "hardware.gpu.memory_gib=${GPU_GIB:-16}" hardware.gpu.usable_fraction=0.94)
MODEL=(model=mixtral-8x7b "model.num_layers=$LAYERS")
MTBENCH=(workload=mtbench workload.num_requests=${REQUESTS:-512} workload.gen_len=${GEN:-32} sampling.ignore_eos=true)

case "$stage" in
  owed)     # what a GPU still owes, in one device call (about 5 minutes), each part bounded so that the next
            # one runs. Two leases on 2026-12-04 ran parity, attention, bench and sim (results/gpu/,
            # results/gpu/mixtral/). Owed after them: the CUDA tests of the gathered paged attention to the
            # end (the second lease's bound cut the last two), the resident bench again, and the streamed
            # bench under the copy worker's new thread share (it took ~80 s there, build included).
    start=$SECONDS
    timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -m gpu -rfE --tb=short -p no:cacheprovider \
      tests/kernels/test_cpu_attention.py tests/engine/test_memtrack.py tests/engine/test_cgopipe.py \
      2>&1 | tee "$dest/owed-tests.log" || echo "gpu_suite.sh: the CUDA tests exited $?"
    echo "tests: $(( SECONDS - start )) s"
    LAYERS=2 GEN=16 BENCH_REPEATS=2 TAG=-resident timeout "${RESIDENT_TIMEOUT:-60}" bash "$0" bench \
      || echo "gpu_suite.sh: the resident bench exited $?"
    LAYERS=4 GEN=8 GPU_GIB=10 BENCH_REPEATS=2 TAG=-streamed timeout "${STREAMED_TIMEOUT:-120}" bash "$0" bench \
      || echo "gpu_suite.sh: the streamed bench exited $?"
    echo "owed: $(( SECONDS - start )) s" ;;
  parity)   # CUDA parity: reference engine (fp32 exact, bf16 tolerance), CGOPipe under every policy and
            # the several-rank code on one NCCL rank (issue 13),
            # every baseline, each parametrized over cpu and cuda (streams, events, pinned staging)
    python3 -c "import torch; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" \
       | tee "$dest/parity.log"
    # pytest-timeout (on the lent machine) ends a hung test rather than the stage: the rest still run
    per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=${TEST_TIMEOUT:-120}" || true)
    timeout "${PARITY_TIMEOUT:-540}" python3 -m pytest -q -m gpu -rfEs --durations=10 -p no:cacheprovider $per_test tests \
       --junitxml="$dest/parity.xml" 2>&1 | tee -a "$dest/parity.log" ;;
  bench)    # issue 3: tokens/s, link utilisation during decode, the link bound, peak GPU memory
    ml task=bench system=cgopipe task.plan=true "${MODEL[@]}" "${BUDGET[@]}" "${MTBENCH[@]}" \
       task.repeats="${BENCH_REPEATS:-3}" trace=true out="$dest/cgopipe-bench-mixtral8x7b-${LAYERS}l${TAG:-}.json" ;;
  predict)  # issue 4: calibrate this machine, plan, run the planned policy, simulate it: errors
    ml task=calibrate task.out_yaml="$dest/conf/hardware/calibrated.yaml" out="$dest/calibrate.json"
    ml --config-dir "$dest/conf" task=bench system=cgopipe task.plan=true hardware=calibrated \
       hardware.gpu.memory_gib=16 hardware.gpu.usable_fraction=0.94 "${MODEL[@]}" "${MTBENCH[@]}" \
       out="$dest/bench-planned-calibrated.json"
    ml --config-dir "$dest/conf" task=simulate task.use_plan=true hardware=calibrated \
       hardware.gpu.memory_gib=16 hardware.gpu.usable_fraction=0.94 "${MODEL[@]}" "${MTBENCH[@]}" \
       out="$dest/simulate-calibrated.json"
    ml task=plan "${MODEL[@]}" "${BUDGET[@]}" "${MTBENCH[@]}" out="$dest/plan-mixtral8x7b-${LAYERS}l.json"
    bash "$0" sim ;;
  sim)      # measured vs simulated vs HRM in one process (the acceptance benchmark, as on the CPU): calibrate
            # this machine, plan, run the planned policy (fresh engines), simulate it, print the errors
    python3 benchmarks/sim_vs_measured.py --device cuda --model mixtral-8x7b --layers "${SIM_LAYERS:-4}" \
       --gpu-memory-gib 16 --usable-fraction 0.94 --requests "${SIM_REQUESTS:-256}" --gen-len 32 \
       --max-batch 256 --repeats "${SIM_REPEATS:-2}" --save --out-dir "$dest" ;;
  compare)  # issue 5: every system side by side on the same model, hardware and workload
    ml task=compare "${MODEL[@]}" model.num_layers=${COMPARE_LAYERS:-4} "${BUDGET[@]}" "${MTBENCH[@]}" \
       run_dir="$dest/compare-mixtral8x7b" ;;
  tune)     # issue 6: a measured tune, at least 10 trials
    ml task=tune "${MODEL[@]}" model.num_layers=${TUNE_LAYERS:-4} "${BUDGET[@]}" "${MTBENCH[@]}" \
       tuner.n_trials=${TRIALS:-10} tuner.trial_timeout_s=240 tuner.storage="sqlite:///$dest/tune.db" \
       run_dir="$dest/tune-mixtral8x7b" ;;
  attention) # issue 11: the paged CPU attention kernel against memcpy on this host's CPU (16 cores),
            # bf16/fp16/fp32, contexts 512 and 4096, batches 8 and 64; then admission and refill
    # the compiled kernel or an error: the fallback's numbers would not be the kernel's
    MOE_LIGHTNING_CPU_ATTENTION=cpp python3 benchmarks/cpu_attention.py --repeats ${ATT_REPEATS:-9} \
       --out "$dest/cpu_attention-gpu-host.json"
    python3 benchmarks/batching.py --repeats 1 --device cuda --save
    cp "$(ls -t results/batching_*.json | head -1)" "$dest/" ;;
esac
if [ -n "${OUT:-}" ]; then cp -r "$dest"/. "$OUT"/ 2>/dev/null || true; fi
