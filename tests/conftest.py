"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os
import pathlib
import shutil

from tests.runs import FAST_COMPILE  # imports no jax

# Each flag once (`make test` exports the device count already): the persistent compilation cache keys on the
# flags as written, and in-process commands (`runs.call`) share its entries with runs.env's children.
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in ("--xla_force_host_platform_device_count=8", *FAST_COMPILE)
                                              if f not in _flags])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests import tiny  # noqa: E402
from tests import tiny_qwen as tiny_qwen_lib  # noqa: E402


# The longest files, longest first: `make test` hands whole files to two xdist workers in collection order
# (--no-loadscope-reorder), and a three-minute file handed out last would run alone at the end. Ordered by
# their seconds in `make test PYTEST_ARGS=--durations=0` (2026-12-07, on a machine other jobs loaded: read
# them as proportions): 460, 436, 251, 224 (two files of that name), 161, 116, 80, 77, 48 (five), 45, 31, 30
# (three); test_pipeline.py since ~30 s less (its resume through one worker process, not two).
SLOW_FIRST = ("test_loop.py", "test_multihost.py", "test_demo.py", "test_train.py", "test_train_step.py",
              "test_lora.py", "test_restart.py", "test_pipeline.py", "test_chain.py", "test_parity.py",
              "test_programs.py", "test_peft_io.py", "test_serve.py", "test_commands.py", "test_moe.py",
              "test_layouts.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """`tiny_llava(name) -> (folder, torch_model)`: a tiny random transformers LLaVA saved once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny.build(name, str(tmp_path_factory.mktemp(name)))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """`tiny_qwen(tied) -> (folder, torch_model)`: a tiny random transformers Qwen2.5-VL saved once per session."""
    cache = {}

    def get(tied: bool):
        if tied not in cache:
            cache[tied] = tiny_qwen_lib.build(tied, str(tmp_path_factory.mktemp("qwen_tied" if tied else "qwen")))
        return cache[tied]

    return get


def _session_folder(tmp_path_factory, name: str) -> pathlib.Path:
    """A folder for the whole session: shared by both xdist workers (their base directories' parent is the
    session's), else this process's base directory."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


def _built_once(tmp_path_factory, name: str, build) -> str:
    """The session folder `name` with what `build(folder)` writes: the first worker to ask builds it, under a
    file lock; the other waits for it and reads the same files (none of them written again)."""
    import filelock

    folder = _session_folder(tmp_path_factory, name)
    with filelock.FileLock(f"{folder}.lock"):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died while building it
            folder.mkdir()
            build(str(folder))
            (folder / ".built").touch()
    return str(folder)


@pytest.fixture(scope="session")
def smoke_dir(tmp_path_factory):
    """`python -m data_prep.smoke` output with 8 pairs (one fixed batch of the smoke config) and 16 SFT
    examples, the prompt files), built once per session."""
    from data_prep import smoke

    return _built_once(tmp_path_factory, "smoke", lambda out: smoke.write_setup(out, pairs=8, sft=16, seed=0))


@pytest.fixture(scope="session")
def qwen_smoke_dir(tmp_path_factory):
    """`python -m data_prep.smoke --family=qwen2_5_vl` output (8 pairs with 0–2 images of different
    sizes each, 16 SFT examples), built once per session."""
    from data_prep import smoke

    return _built_once(tmp_path_factory, "qwen_smoke",
                       lambda out: smoke.write_setup(out, pairs=8, sft=16, seed=0, family="qwen2_5_vl"))


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """A persistent JAX compilation cache shared by the commands tests run in subprocesses, and by both
    xdist workers: a program one worker's commands compiled, the other's read. `runs.env` turns on JAX's
    file lock around the cache's reads and writes."""
    path = _session_folder(tmp_path_factory, "jax_cache")
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def sft_run(smoke_dir, compile_cache, tmp_path_factory):
    """A finished `python -m rdpo_jax.train` SFT run of the smoke config with scanned decoder layers
    (stacked parameters, so that checkpoints, export and load_model go through that layout) and two
    examples per row where they fit (`data.groups_per_row`): 6 steps, checkpoints kept at steps 4 and 6.
    Run in the test process (`runs.call`; the command's process is tested in test_train.py), once per
    session. Returns (workdir, what it printed)."""
    from tests import runs

    def train(folder):
        out = runs.call("rdpo_jax.train", *runs.train_args(smoke_dir, f"{folder}/run", "--config.model.scan_layers=on",
                                                           "--config.data.groups_per_row=2",
                                                           "--config.data.seq_buckets=(48, 80)", objective="sft"),
                        compile_cache=compile_cache)
        pathlib.Path(folder, "printed.txt").write_text(out)

    folder = _built_once(tmp_path_factory, "sft_run", train)
    return f"{folder}/run", pathlib.Path(folder, "printed.txt").read_text()


@pytest.fixture(scope="session", autouse=True)
def _check_devices():
    if jax.default_backend() != "cpu":  # JAX_PLATFORMS=cuda (benchmarks/gpu_check.sh): the parity tests on one GPU
        return
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices (XLA_FLAGS set in conftest.py)"
