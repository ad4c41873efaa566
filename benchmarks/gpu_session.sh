#!/usr/bin/env bash
# One device call of the GPU session: `bash benchmarks/gpu_session.sh <step>...` from the repo root, with
# $OUT set (the device tool's output folder). Carried wheels in .whl/ are installed first (the GPU image
# has no network). Steps: env, kernels, props, tests (= kernels + props), tests-compose, tune, bench (every
# suite but the optional compiled cases, one run), bench-decode, bench-compile, profile, bench-model,
# bench-rest, quick, rownorm-tests, fold-tests, norm-sweep, norm-probe, gemm-sweep, compose-gpu-tests,
# autograd-gpu-tests, bwd-groups. Time boxes are variables (KERNEL_BOX, TEST_BOX, BENCH_BUDGET) so one call can be fitted into
# the device tool's limit.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ','').replace(' ','-'))" 2>/dev/null || echo gpu)
STAMP=$(date +%Y%m%d)
RESULTS=benchmarks/results/${GPU}-${STAMP}.json

for step in "$@"; do
    echo "=== step $step ($(date +%T))"
    case $step in
        env)
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/env.txt"
            python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
            ;;
        kernels | tests)
            # GPU-marked kernel tests; -v keeps a per-test record even if the time box cuts a run.
            timeout ${KERNEL_BOX:-200} python3 -m pytest -v -p no:cacheprovider --timeout 150 -rs -m gpu tests/kernels \
                2>&1 | tee "$OUT/gpu_tests_kernels.log" | grep -E "passed|failed|FAILED|ERROR|Timeout" | tail -15
            ;;&
        props | tests)
            # The autograd/compile tests and the layer/norm property tests on CUDA tensors (fused kernels on).
            DORAFACTORS_TEST_DEVICE=cuda timeout ${TEST_BOX:-250} python3 -m pytest -v -p no:cacheprovider --timeout 150 \
                -rs tests/autograd tests/layers tests/norm 2>&1 | tee "$OUT/gpu_tests.log" \
                | grep -E "passed|failed|FAILED|ERROR|Timeout" | tail -25
            ;;
        kernels) ;;
        tests-compose)
            timeout ${TEST_BOX:-330} python3 -m pytest -v -p no:cacheprovider --timeout 150 -rs \
                tests/kernels/test_compose_kernels.py 2>&1 | tee "$OUT/gpu_tests_compose.log" \
                | grep -E "passed|failed|FAILED|ERROR|Timeout" | tail -25
            ;;
        tune)
            timeout 200 python3 benchmarks/tune_norm.py --quick 2>&1 | tail -40
            timeout 200 python3 benchmarks/tune_compose.py --quick 2>&1 | tail -40
            ;;
        bench)
            B=${BENCH_BUDGET:-420}
            timeout $((B + B / 5 + 60)) python3 -m benchmarks run --suite model,decode,layer,norm,compose,ranks \
                --no-compile --out "$RESULTS" --time-budget "$B" 2>&1 | tee "$OUT/bench.log" | tail -40
            cp "$RESULTS" "$OUT/" 2>/dev/null
            ;;
        bench-decode)
            # decode and layer suites again (e.g. after a dispatch change), appended to the day's file
            timeout 300 python3 -m benchmarks run --suite decode,layer --no-compile --out "$RESULTS" \
                --time-budget 200 2>&1 | tee "$OUT/bench_decode.log" | tail -30
            cp "$RESULTS" "$OUT/" 2>/dev/null
            ;;
        bench-compile)
            # the optional torch.compile providers alone
            timeout 420 python3 -m benchmarks run --case '*#compile' --out "$RESULTS" --time-budget 330 2>&1 \
                | tee "$OUT/bench_compile.log" | tail -30
            cp "$RESULTS" "$OUT/" 2>/dev/null
            ;;
        profile)
            timeout 120 python3 benchmarks/profile_host.py 2>&1 | tee "$OUT/profile_host.log" | tail -40
            ;;
        bench-model)
            python3 -m benchmarks run --suite model,decode --out "$RESULTS" --time-budget 420 2>&1 | tail -30
            cp "$RESULTS" "$OUT/" 2>/dev/null
            ;;
        bench-rest)
            python3 -m benchmarks run --suite layer,norm,compose,ranks --out "$RESULTS" --time-budget 420 2>&1 | tail -30
            cp "$RESULTS" "$OUT/" 2>/dev/null
            ;;
        quick)
            timeout 120 python3 -m benchmarks run --quick --no-compile --out "$OUT/quick.json" 2>&1 | tail -15
            ;;
        rownorm-tests)
            timeout ${TEST_BOX:-200} python3 -m pytest -v -p no:cacheprovider --timeout 150 -rs -m gpu \
                tests/kernels/test_row_norm_kernel.py 2>&1 | tee "$OUT/gpu_tests_row_norm.log" \
                | grep -E "passed|failed|FAILED|ERROR|Timeout" | tail -15
            ;;
        fold-tests)
            DORAFACTORS_TEST_DEVICE=cuda timeout ${TEST_BOX:-150} python3 -m pytest -v -p no:cacheprovider \
                --timeout 150 -rs tests/layers/test_folded_inference.py tests/norm/test_norm_cache.py 2>&1 \
                | tee "$OUT/gpu_tests_fold_cache.log" | grep -E "passed|failed|FAILED|ERROR|Timeout" | tail -15
            ;;
        norm-sweep)
            timeout 260 python3 benchmarks/tune_norm.py --sweep --budget-s ${SWEEP_BUDGET:-220} 2>&1 \
                | tee "$OUT/norm_sweep.log" | grep -E "^sweep" | tail -20
            ;;
        norm-probe)
            timeout 200 python3 benchmarks/tune_norm.py --gemm-probe 2>&1 | tee "$OUT/norm_gemm_probe.log" | tail -30
            ;;
        gemm-sweep)
            timeout 260 python3 benchmarks/tune_norm.py --gemm-sweep --budget-s ${SWEEP_BUDGET:-200} 2>&1 \
                | tee "$OUT/norm_gemm_sweep.log" | tail -90
            ;;
        compose-gpu-tests)
            timeout ${TEST_BOX:-150} python3 -m pytest -v -p no:cacheprovider --timeout 150 -rs -m gpu \
                tests/kernels/test_compose_kernels.py 2>&1 | tee "$OUT/gpu_tests_compose.log" \
                | grep -E "passed|failed|FAILED|ERROR|Timeout" | tail -15
            ;;
        autograd-gpu-tests)
            # the autograd and torch.compile tests on CUDA tensors (fused kernels on)
            DORAFACTORS_TEST_DEVICE=cuda timeout ${TEST_BOX:-150} python3 -m pytest -v -p no:cacheprovider \
                --timeout 150 -rs tests/autograd 2>&1 | tee "$OUT/gpu_tests_autograd.log" \
                | grep -E "passed|failed|FAILED|ERROR|Timeout" | tail -15
            ;;
        bwd-groups)
            timeout 200 python3 benchmarks/tune_compose.py --no-host --bwd-groups ${BWD_GROUPS:-4,8,16,32} 2>&1 \
                | tee "$OUT/tune_compose_bwd_groups.log" | tail -30
            ;;
        *) echo "unknown step $step" ;;
    esac
done
echo "=== done ($(date +%T))"
