#!/usr/bin/env bash
# On a machine with a CUDA GPU, in the repository root, with the worker's packages installed:
#   bench/gpu.sh OUT_DIR [STAGE]...
# tests: the engine's tests on CUDA (tests/worker, test_engine_cuda.py included) and the
#        embedded demo with its worker on the GPU;
# tiny: bench.engine on the tiny model at 1024 px;
# sd15 / sdxl: bench.engine on full-size random-weight models (512 / 1024 px, fp16, 20 steps);
# sd15c / sdxlc: the same with torch.compile (mode: $COMPILE_MODE, default "default").
# batches (#24, about 8 minutes on an H200): bench.batches sweep at batch 1,2,4,8 for SD1.5
#        512 px (fp16, bf16, and compiled reduce-overhead) and SDXL 1024 px 30 steps (fp16),
#        then the embedded stack with a backlog vs the bare loop, with the GPU's busy
#        fraction. Full-size random-weight models (bench/full_models.py: the real models'
#        compute, no weights needed); where they cannot be built it falls back to the tiny
#        models and says so.
# stackc (#24 item 3): the embedded stack with POSEGEN_COMPILE (mode: $COMPILE_MODE, default
#        reduce-overhead): the worker compiles SD1.5 512 px at batch 1 to $MAX_BATCH as it
#        starts (compile_warm_up_s), then runs the backlog on the compiled path.
# Each writes its JSON and log under OUT_DIR.
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUT_DIR [STAGE]...}
shift
stages=${*:-tests sd15 sd15c sdxl sdxlc}
mkdir -p "$out"
models=$(mktemp -d)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"
for stage in $stages; do
    case $stage in
    tests)
        timeout 420 python3 -m pytest -q -p no:cacheprovider -rs --durations=10 tests/worker \
            tests/test_end_to_end.py::test_demo_runs_end_to_end >"$out/tests.log" 2>&1
        echo "tests: exit $?"; grep -E "^(FAILED|ERROR)|^E  +[A-Za-z]*(Error|assert)" "$out/tests.log" | head -60; tail -n 3 "$out/tests.log"
        ;;
    tiny)  # the tiny model at 1024 px: peak memory per memory-saving mode, phases
        python3 -m bench.engine --size 1024 --steps 4 --repeats 3 >"$out/engine-tiny-1024.json" 2>"$out/engine-tiny-1024.log"
        grep -A7 "phases\|by_mode" "$out/engine-tiny-1024.json"
        ;;
    sd15 | sd15c | sdxl | sdxlc)
        family=${stage%c}
        size=512
        [ "$family" = sdxl ] && size=1024
        compiled=""
        [ "$stage" != "$family" ] && compiled="--compile --compile-mode ${COMPILE_MODE:-default}"
        name="engine-$stage"
        started=$(date +%s)
        python3 -m bench.engine --full --family "$family" --size "$size" --steps 20 \
            --dtype fp16 --repeats "${REPEATS:-5}" --model-dir "$models" $compiled \
            >"$out/$name.json" 2>"$out/$name.log"
        echo "$name: exit $? in $(($(date +%s) - started)) s"
        python3 - "$out/$name.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as exc:
    print("  no result:", exc)
else:
    keys = ("model", "engine_run_s_median", "bare_pipeline_s_median", "ratio_engine_over_bare",
            "engine_phases_ms_median", "bare_it_per_s", "denoising_loop_it_per_s", "models_gib",
            "gpu_run_peak_gib_by_mode", "pose_extraction_ms_median", "model_load_s")
    print("  " + json.dumps({k: r.get(k) for k in keys}))
PY
        tail -n 2 "$out/$name.log"
        ;;
    batches)
        full="--full"
        python3 -c 'import bench.full_models' 2>/dev/null || { full=""; echo "NOTE: full-size models unavailable: tiny models, figures not comparable"; }
        run() { name=$1; shift; timeout "${LIMIT:-150}" python3 -m bench.batches "$@" --model-dir "$models" >"$out/$name.json" 2>"$out/$name.log"; echo "$name: exit $?"; tail -n 12 "$out/$name.json"; }
        run batches-sd15-fp16 sweep $full --family sd15 --size 512 --steps 20 --dtype fp16 --batches 1,2,4,8
        run batches-sd15-bf16 sweep $full --family sd15 --size 512 --steps 20 --dtype bf16 --batches 1,4
        LIMIT=200 run batches-sd15-graphs sweep $full --family sd15 --size 512 --steps 20 --dtype fp16 --batches 1,4 --compile --compile-mode reduce-overhead
        run batches-sdxl-fp16 sweep $full --family sdxl --size 1024 --steps 30 --dtype fp16 --batches 1,2,4,8 --repeats 3
        LIMIT=150 run batches-stack-sd15 stack $full --family sd15 --size 512 --steps 20 --jobs 32 --max-batch "${MAX_BATCH:-4}"
        ;;
    stackc)
        full="--full"
        python3 -c 'import bench.full_models' 2>/dev/null || { full=""; echo "NOTE: full-size models unavailable: tiny models, figures not comparable"; }
        timeout "${LIMIT:-420}" python3 -m bench.batches stack $full --family sd15 --size 512 --steps 20 --jobs 32 \
            --max-batch "${MAX_BATCH:-4}" --compile --compile-mode "${COMPILE_MODE:-reduce-overhead}" \
            --model-dir "$models" >"$out/batches-stack-sd15-compiled.json" 2>"$out/batches-stack-sd15-compiled.log"
        echo "batches-stack-sd15-compiled: exit $?"; tail -n 14 "$out/batches-stack-sd15-compiled.json"
        ;;
    *) echo "unknown stage $stage" >&2 ;;
    esac
done
