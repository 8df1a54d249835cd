#!/usr/bin/env bash
# What to run first on a GPU node, in one go: the GPU tests, benchmarks/gpu.py and a short
# decoder sweep with several workers sharing the GPU. Each step has its own time limit, so
# one that fails or hangs does not hide the others; logs go to $OUT (default: ./gpu-node).
#
#   bash benchmarks/gpu_node.sh            # with qkvsearch and its needs installed
#   WHEELS=.whl bash benchmarks/gpu_node.sh  # first install the wheels in .whl (offline)
set -u
OUT=${OUT:-gpu-node}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ -n "${WHEELS:-}" ]; then  # an offline machine: needs carried as wheels, qkvsearch from this tree
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --target /tmp/site "$WHEELS"/*.whl . || exit 1
    export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import torch, lightning, optuna; print('torch', torch.__version__, 'lightning', lightning.__version__, 'optuna', optuna.__version__)" | tee -a "$OUT/device.txt"

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, logs to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
}

step tests "${TESTS_S:-240}" $PY -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu.py ${TESTS_K:+-k "$TESTS_K"}
[ -n "${PROFILE:-}" ] && step profile 90 $PY benchmarks/gpu.py --profile --steps 10 --batch "${BATCH:-8}"
step bench "${BENCH_S:-200}" $PY benchmarks/gpu.py --steps 30 --batch "${BATCH:-8}"
step packing "${PACKING_S:-240}" $PY benchmarks/gpu.py --packing --ks ${KS:-1 4 16} --packing-trials "${PACKING_TRIALS:-16}"
RUN=$(mktemp -d)
step sweep "${SWEEP_S:-150}" $PY -m qkvsearch.search.cli sweep trainer=gpu space=decoder task=recall n_trials=16 workers=4 trials_per_gpu=4 \
    trainer.max_steps=400 trainer.val_check_interval=100 trainer.limit_val_batches=4 "run_root=$RUN" study_name=gpu_node
$PY - "$RUN" <<'EOF' | tee "$OUT/sweep_trials.txt"
import sys, optuna
study = optuna.load_study(study_name="gpu_node", storage=f"sqlite:///{sys.argv[1]}/studies.db")
for t in study.trials:
    a = t.user_attrs
    print(t.number, t.state.name, t.values, a.get("device"), a.get("n_params"), a.get("train_tokens_per_s"),
          a.get("mfu"), a.get("peak_memory_mb"), t.duration)
EOF
