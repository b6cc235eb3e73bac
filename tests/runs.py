"""Running the real commands (`python -m rdpo_jax.train`, launch scripts) from tests: in subprocesses, or
in the test process where a test is about what a command computes, not about its process (`call`)."""

import contextlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny models' programs spend far more time in XLA's compiler than running: without LLVM's optimisation
# passes the suite compiles ~40% faster, and with XLA:CPU's elemental IR fusion emitters instead of its MLIR
# ones a train step compiles in less than half the time again. The test process (conftest.py) and its
# children compile with both; results are checked under the same flags, tolerances unchanged.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def env(compile_cache: str, devices: int = 8) -> dict:
    """The test environment for a child process: CPU, `devices` simulated devices, a shared compile cache,
    and the test process's fast-compile XLA flags (conftest.py). Runs compared bitwise must all compile with
    the same flags (an uninterrupted pair through launch/local_multiprocess.sh, which sets its own, and
    preempted pairs with these were 1e-7 apart). A child that crashes (a segfault was seen once in a
    trainer) prints every thread's Python stack (faulthandler) at the end of its stderr, which `run` shows."""
    flags = " ".join((f"--xla_force_host_platform_device_count={devices}", *FAST_COMPILE))
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONFAULTHANDLER="1",
                JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30),  # a size limit makes JAX lock the cache's files
                PYTHONPATH=ROOT)


def train_args(smoke_dir: str, workdir: str, *overrides: str, objective: str = "dpo") -> list[str]:
    return [f"--config=configs/smoke.py:dir={smoke_dir},objective={objective}", f"--workdir={workdir}", *overrides]


def train_command(smoke_dir: str, workdir: str, *overrides: str, objective: str = "dpo") -> list[str]:
    return [sys.executable, "-m", "rdpo_jax.train", *train_args(smoke_dir, workdir, *overrides, objective=objective)]


def run(cmd: list[str], environment: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def call(module: str, *args: str, compile_cache: str | None = None) -> str:
    """`python -m MODULE ARGS` in this process (its `__main__` block run by runpy); returns what it printed.
    A child pays seconds for the interpreter, the JAX and transformers imports and the compile cache before
    the command starts; this pays none. Commands define their absl flags as they start, and several share
    names (--out, --config, --distributed_auto), so the other commands' flags (data_prep.*, rdpo_jax.*; for a
    data_prep command not data_prep.common, the library its shared flags come from) are set aside for the call, and afterwards everything is put back as it was: those flags, the
    flags' parse state, the working directory (the repository's during the call, as `run`'s), the SIGTERM
    handler and the compile cache folder (which a command may set for its process).

    `compile_cache`: the call reads and writes that persistent compilation cache as a child with
    `env(compile_cache)` does (the same folder, settings and XLA flags: the same programs, the same
    entries); JAX's cache state is reset around the call, so that the test process's own compiles before
    and after it stay uncached."""
    import jax
    from absl import flags
    from jax.experimental.compilation_cache import compilation_cache

    values = flags.FLAGS
    library = "data_prep.common" if module.startswith("data_prep.") else None
    aside = {name: _drop(values, defined) for name, defined in values.flags_by_module_dict().items()
             if name.startswith(("data_prep.", "rdpo_jax.")) and name != library}
    parsed, sigterm = values.is_parsed(), signal.getsignal(signal.SIGTERM)
    settings = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
    environ = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if compile_cache:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = compile_cache  # what a command's own cache setting defers to
        for name, value in zip(_CACHE_SETTINGS, (compile_cache, 0, 8 << 30)):
            jax.config.update(name, value)
        compilation_cache.reset_cache()
    # absl files a __main__ module's flags under sys.argv[0]; ml_collections reads --config.* from sys.argv
    argv, sys.argv = sys.argv, [module, *args]
    cwd, out = os.getcwd(), io.StringIO()
    os.chdir(ROOT)  # where `run` starts commands: configs/NAME.py paths are relative to the repository
    try:
        values.unparse_flags()
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            # the module may be imported already (as a library); a second copy runs as __main__, as intended
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            runpy.run_module(module, run_name="__main__")
    except SystemExit as exit:  # app.run ends with sys.exit(main(argv))
        if exit.code not in (None, 0):
            raise
    finally:
        sys.argv = argv
        os.chdir(cwd)
        values.unparse_flags()
        _drop(values, values.flags_by_module_dict().get(module, []))
        _drop(values, [values[name] for name in values if "." in name])  # --config.FIELD, made by each parse
        for name, defined in aside.items():
            for flag in defined:
                values[flag.name] = flag
                values.register_flag_by_module(name, flag)
        if parsed:
            values.mark_as_parsed()
        signal.signal(signal.SIGTERM, sigterm)
        for name, value in settings.items():
            jax.config.update(name, value)
        if environ is None:
            os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        else:
            os.environ["JAX_COMPILATION_CACHE_DIR"] = environ
        if compile_cache:
            compilation_cache.reset_cache()
    return out.getvalue()


# The persistent cache settings `env` gives a child (its JAX_* variables), in the order `call` sets them.
_CACHE_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                   "jax_compilation_cache_max_size")


def _drop(values, defined: list) -> list:
    """Removes these flags from `values`; returns them."""
    defined = list(defined)  # absl removes each from the module's list, which may be this one
    for flag in defined:
        if flag.name in values and values[flag.name] is flag:
            delattr(values, flag.name)
    return defined


def metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_params(workdir: str, smoke_dir: str) -> tuple[dict, int]:
    """A smoke run's latest parameters as numpy arrays (in the run's layer layout), and their step."""
    import jax
    import numpy as np
    from flax import nnx

    from rdpo_jax import checkpoint

    model, _, folder, step = checkpoint.load_model(workdir)
    assert os.path.samefile(folder, os.path.join(smoke_dir, "model")), folder
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(np.asarray, params), step


def prompts_jsonl(folder, n: int = 6) -> str:
    """`build_rubrics` input: n prompts describing random 24×24 images, with ground truth for the verifier."""
    from data_prep import smoke

    return smoke.write_prompts(str(folder), "prompts", n=n, seed=0)
