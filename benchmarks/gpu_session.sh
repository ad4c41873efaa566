#!/usr/bin/env bash
# Run the GPU tests, benchmark suites and the tune command on one CUDA machine; logs and results go to $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh env gpu-tests cuda-props
#   OUT=/tmp/out bash benchmarks/gpu_session.sh gpu-tests tests/kernels            # one part of the GPU tests
#   OUT=/tmp/out bash benchmarks/gpu_session.sh bench model,decode bench layer,norm,compose,ranks
#   OUT=/tmp/out bash benchmarks/gpu_session.sh tune norm,compose,fold
#   OUT=/tmp/out bash benchmarks/gpu_session.sh compiled-decode compiled-floor train-floor decode-floor
#
# Steps run in the order given (from the repository root):
#   env                 GPU, driver and package versions            -> $OUT/env.txt
#   gpu-tests [PATHS]   every test marked `gpu` (pytest -m gpu), or those under the test paths that
#                       follow (tests/...; the whole set takes more than 10 minutes on an H200, more than
#                       one device call allows with a start)           -> $OUT/gpu_tests.log (appended)
#   cuda-props          the autograd, layer and norm tests on CUDA tensors, kernels on
#                       (DORAFACTORS_TEST_DEVICE=cuda)               -> $OUT/cuda_props.log
#   bench SUITES        python -m benchmarks run --suite SUITES      -> $OUT/<gpu>-<date>.json (+ .log); calls
#                       in one session append to the same file; copy it to benchmarks/results/, then run
#                       `python -m benchmarks report` and `python -m benchmarks plot <file>`; BENCH_CASE
#                       (a glob, e.g. '*#compile' for the compiled cases only) is passed as --case, and the
#                       committed results as --calibrate (BENCH_CALIBRATE=0 keeps the priors)
#   tune [PARTS]        python -m benchmarks tune --only PARTS       -> $OUT/tune.json (+ .log)
#   compiled-decode     benchmarks/profile_compiled.py --tokens 1 --rounds 7, both dtype setups: compiled
#                       LoRA and dorafactors side by side, host time in interleaved rounds
#                                                    -> $OUT/compiled_decode_<setup>.json (+ .log)
#   compiled-floor      benchmarks/compiled_decode_floor.py --with-stock: compiled decode of 1 token timed in
#                       turn for LoRA, dorafactors and dorafactors with its norm check skipped, both dtype
#                       setups (about 3 minutes)              -> $OUT/compiled_decode_floor.json (+ .log)
#   train-floor         benchmarks/train_layer_floor.py: the 4096x4096 layer's fwd+bwd timed in turn for PEFT's
#                       LoRA and dorafactors layers and the bare calls of their operations (about 1 minute)
#                                                    -> $OUT/train_layer_floor.json (+ .log)
#   decode-floor        benchmarks/decode_layer_floor.py: the decode suite's one-layer cases timed in turn for
#                       PEFT's LoRA and dorafactors layers, dorafactors with its fold check skipped and the bare
#                       operations (about 1 minute)        -> $OUT/decode_layer_floor.json (+ .log)
#
# The device machine's copy of .git can lag behind the working tree it receives: give the commit the results
# rows record as DORAFACTORS_GIT_COMMIT=<hash> (benchmarks/harness.py reads it), e.g. by writing the hash into
# the command from the machine that sends it.
#
# Time boxes, in seconds: TEST_BOX bounds each test step (coreutils timeout with SIGINT: a cut run is logged
# as such, "KeyboardInterrupt", never as passed, and still reports the tests that ran and the slowest 20 of
# them, so the next call can split the step), BENCH_BUDGET is the benchmark's --time-budget, BENCH_ROUNDS its
# --rounds (interleaved rounds of the host-bound layer and decode cases; default 3). A .whl/ folder of wheels, for a machine
# without network access, is installed into /tmp/site first.
set -uo pipefail
OUT=${OUT:?set OUT to the folder that receives the logs and results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ','').replace(' ','-'))" 2>/dev/null || echo gpu)
RESULTS="$OUT/${GPU}-$(date +%Y%m%d).json"
TEST_BOX=${TEST_BOX:-600}
BENCH_BUDGET=${BENCH_BUDGET:-420}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}

summary() { grep -E "passed|failed|FAILED|ERROR|KeyboardInterrupt|^[0-9.]+s (call|setup|teardown) |^=+ .* in [0-9.]+s" | tail -45; }

while [ $# -gt 0 ]; do
    step=$1
    shift
    echo "=== $step"
    case $step in
        env)
            nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env.txt"
            python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
            ;;
        gpu-tests)
            paths=()
            while [ $# -gt 0 ] && [[ $1 == tests* ]]; do
                paths+=("$1")
                shift
            done
            [ ${#paths[@]} -gt 0 ] || paths=(tests)
            timeout -s INT -k 30 "$TEST_BOX" python3 -m pytest -v -p no:cacheprovider -rs --durations=20 -m gpu "${paths[@]}" 2>&1 \
                | tee -a "$OUT/gpu_tests.log" | summary
            ;;
        cuda-props)
            DORAFACTORS_TEST_DEVICE=cuda timeout -s INT -k 30 "$TEST_BOX" python3 -m pytest -v -p no:cacheprovider -rs \
                --durations=20 \
                tests/autograd tests/layers tests/norm 2>&1 | tee "$OUT/cuda_props.log" | summary
            ;;
        bench)
            suites=${1:?bench needs a comma list of suites (model,decode,layer,norm,compose,ranks)}
            shift
            case_args=()
            [ -n "${BENCH_CASE:-}" ] && case_args=(--case "$BENCH_CASE")
            # the committed results' measured case times as estimates (the priors of a compiled case exceed
            # most budgets); BENCH_CALIBRATE=0 keeps the priors
            if [ "${BENCH_CALIBRATE:-1}" != 0 ] && ls benchmarks/results/*.json >/dev/null 2>&1; then
                case_args+=(--calibrate benchmarks/results/*.json)
            fi
            timeout $((BENCH_BUDGET + BENCH_BUDGET / 5 + 60)) python3 -m benchmarks run --suite "$suites" ${case_args[@]+"${case_args[@]}"} \
                --out "$RESULTS" --time-budget "$BENCH_BUDGET" --rounds "$BENCH_ROUNDS" --no-progress 2>&1 | tee -a "${RESULTS%.json}.log" | tail -40
            ;;
        tune)
            parts=norm,compose,fold
            if [ $# -gt 0 ] && [[ $1 != *[!a-z,]* ]] && [[ $1 != env && $1 != bench && $1 != tune && $1 != *-* ]]; then
                parts=$1
                shift
            fi
            python3 -m benchmarks tune --only "$parts" 2>&1 | tee "$OUT/tune.log" | tail -30
            ;;
        compiled-decode)
            for setup in bf16 peft-default; do
                mkdir -p "$OUT/compiled_decode_$setup"
                OUT="$OUT/compiled_decode_$setup" timeout 540 python3 benchmarks/profile_compiled.py --tokens 1 \
                    --rounds 7 --setup "$setup" 2>&1 | tee "$OUT/compiled_decode_$setup.log" | grep -E "^(==|   host|graphs)"
                mv "$OUT/compiled_decode_$setup/profile_compiled.json" "$OUT/compiled_decode_$setup.json" 2>/dev/null
                rmdir "$OUT/compiled_decode_$setup" 2>/dev/null
            done
            ;;
        compiled-floor)
            OUT="$OUT" timeout 540 python3 benchmarks/compiled_decode_floor.py --with-stock 2>&1 \
                | tee "$OUT/compiled_decode_floor.log" | grep -E "token|skipped"
            ;;
        train-floor)
            OUT="$OUT" timeout 300 python3 benchmarks/train_layer_floor.py 2>&1 | tee "$OUT/train_layer_floor.log" \
                | grep -E "tokens|bare"
            ;;
        decode-floor)
            OUT="$OUT" timeout 300 python3 benchmarks/decode_layer_floor.py 2>&1 | tee "$OUT/decode_layer_floor.log" \
                | grep -E "token"
            ;;
        *)
            echo "unknown step $step (env, gpu-tests [PATHS], cuda-props, bench SUITES, tune [PARTS], compiled-decode, compiled-floor, train-floor, decode-floor)" >&2
            exit 2
            ;;
    esac
done
echo "=== done"
