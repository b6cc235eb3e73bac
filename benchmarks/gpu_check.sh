#!/usr/bin/env bash
# The checks that need a GPU, in one short run on a lent single-GPU machine with no network (the device
# tool's `run`): from the repository root,
#
#     set -o pipefail; bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
#
# Parts, each under `timeout`, all within BUDGET seconds (default 540, inside one 600 s call):
#   wheels       the carried wheels in .whl/ (an ignored folder named in `carry`), installed offline into
#                /tmp/site: grain, array-record, ml-collections and portpicker, which the image lacks (cp312
#                manylinux wheels, fetched here with `pip download --only-binary=:all: --python-version 3.12`).
#                The parts below import none of them; without .whl/ this part only says so.
#   nvidia-smi   the GPU and its driver
#   jax          versions and jax.devices()
#   step_cudnn   benchmarks/gpu_step.py at its default size (0.845B, 8 pairs), cuDNN attention
#   step_xla     the same with XLA's attention
#   parity       the LLaVA and Qwen2.5-VL parity tests on the GPU: JAX_PLATFORMS=cuda (tests/conftest.py then
#                skips its 8-CPU-device check), fp32 matmuls at full precision rather than TF32 for their 1e-4
#                tolerance, the sharded test (8 devices) left out
# A failed part does not stop the next; the failures are listed at the end and the exit status is 1.
# PYTHON (default python3) is the interpreter; GPU_STEP_ARGS adds flags to both gpu_step.py runs; PARTS
# (default all) names the parts to run, e.g. PARTS="wheels step_xla" to rerun one on a warm machine.
set -euo pipefail

export PY=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
PARTS=${PARTS:-wheels nvidia-smi jax step_cudnn step_xla parity}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX's pool is 75% of the GPU by default; the XLA-attention step at 8 pairs needs ~58 GiB (its CPU compile's
# memory analysis), too close to 75% of an H100's 79.6 GiB
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
failed=()

# part NAME SECONDS COMMAND...: runs COMMAND under `timeout`, shortened to what is left of BUDGET.
part() {
    local name=$1 limit=$2 rc=0 t0=$SECONDS
    shift 2
    if [[ " $PARTS " != *" $name "* ]]; then return; fi
    if ((BUDGET - SECONDS < limit)); then limit=$((BUDGET - SECONDS)); fi
    echo "===== $name (at ${SECONDS}s, limit ${limit}s)"
    if ((limit < 10)); then
        failed+=("$name: no time left")
        return
    fi
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    if ((rc == 0)); then
        echo "===== $name: ok in $((SECONDS - t0))s"
    else
        if ((rc == 124)); then rc="124, timed out"; fi
        echo "===== $name: FAILED, exit status $rc, in $((SECONDS - t0))s"
        failed+=("$name: exit status $rc")
    fi
}

# The carried wheels (.whl/*.whl), installed offline into /tmp/site.
install_wheels() {
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "no carried wheels in .whl/ (gpu_step.py and the parity tests need none)"
        return
    fi
    ls -l .whl
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH=$PYTHONPATH:/tmp/site "$PY" -c "import grain, array_record, ml_collections; print(grain.__version__)"
}
export -f install_wheels

part wheels 30 bash -c install_wheels
if [ -d /tmp/site ]; then export PYTHONPATH=$PYTHONPATH:/tmp/site; fi
part nvidia-smi 30 nvidia-smi
part jax 45 "$PY" -c 'import jax, jaxlib, flax, optax, transformers
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "transformers", transformers.__version__)
print(jax.devices(), jax.devices()[0].device_kind)'
# shellcheck disable=SC2086  # GPU_STEP_ARGS: several flags
part step_cudnn 150 "$PY" benchmarks/gpu_step.py --attention=cudnn ${GPU_STEP_ARGS:-}
# shellcheck disable=SC2086
part step_xla 150 "$PY" benchmarks/gpu_step.py --attention=xla ${GPU_STEP_ARGS:-}
part parity 150 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q -n 0 \
    tests/models/llava/test_parity.py tests/models/qwen2_5_vl/test_parity.py \
    --deselect tests/models/qwen2_5_vl/test_parity.py::test_sharded_equals_single_device_and_heads_split_whole

echo "===== done in ${SECONDS}s"
if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all parts passed"
