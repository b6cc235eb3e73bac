"""The launch scripts' --dry-run output: the exact commands they would run. (The local multi-process
script also really runs 2 processes of the smoke config: tests/test_train.py::test_two_processes_match_one.)"""

import os
import subprocess
import sys

import pytest

from tests import runs


def _dry_run(script, *args, environment=None, expect_rc=0):
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **(environment or {})}
    proc = subprocess.run(["bash", f"launch/{script}", *args], cwd=runs.ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == expect_rc, proc.stderr
    return proc.stdout.splitlines() if expect_rc == 0 else proc.stderr


TRAIN = ["--config=configs/llava15_7b_tpu.py:data=/gcs/bucket/pairs", "--workdir=/gcs/bucket/run",
         "--config.data.train=/gcs/bucket/pairs round 2"]


def test_tpu_vm_all_stages():
    lines = _dry_run("tpu_vm.sh", "all", "--dry-run", "--name=rdpo", "--zone=us-east5-a", "--type=v5p-64",
                     "--project=proj", "--spot", "--", *TRAIN)
    zone = "--zone=us-east5-a --project=proj"
    assert lines == [
        f"gcloud compute tpus tpu-vm create rdpo {zone} --accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot",
        f"tar -czf /tmp/rdpo_jax-src.tar.gz -C {runs.ROOT} --exclude=.git --exclude=.venv --exclude=demo_workdir "
        "'--exclude=*.egg-info' .",
        f"gcloud compute tpus tpu-vm scp /tmp/rdpo_jax-src.tar.gz rdpo:rdpo_jax-src.tar.gz {zone} --worker=all",
        f"gcloud compute tpus tpu-vm ssh rdpo {zone} --worker=all '--command=rm -rf ~/rdpo_jax && "
        "mkdir -p ~/rdpo_jax && tar -xzf ~/rdpo_jax-src.tar.gz -C ~/rdpo_jax && python3 -m venv ~/rdpo_venv && "
        "~/rdpo_venv/bin/pip install -q -U pip && ~/rdpo_venv/bin/pip install -q -e \"$HOME/rdpo_jax[tpu]\"'",
        f"gcloud compute tpus tpu-vm ssh rdpo {zone} --worker=all '--command=cd ~/rdpo_jax && "
        "~/rdpo_venv/bin/python -m rdpo_jax.train --config=configs/llava15_7b_tpu.py:data=/gcs/bucket/pairs "
        "--workdir=/gcs/bucket/run '\\''--config.data.train=/gcs/bucket/pairs round 2'\\'' "
        "--config.distributed.auto=True'",
    ]


def test_tpu_vm_queued_resource_from_environment_and_detached_train():
    env = {"TPU_NAME": "pod", "TPU_ZONE": "europe-west4-b", "TPU_TYPE": "v5litepod-16",
           "TPU_RUNTIME": "v2-alpha-tpuv5-lite"}
    assert _dry_run("tpu_vm.sh", "create", "--queued", "--dry-run", environment=env) == [
        "gcloud compute tpus queued-resources create pod --node-id=pod --zone=europe-west4-b "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite",
        "gcloud compute tpus queued-resources describe pod --zone=europe-west4-b '--format=value(state.state)'",
        "# (repeated every 30 s until it prints ACTIVE)",
    ]
    assert _dry_run("tpu_vm.sh", "train", "--detach", "--dry-run", "--", "--config=c.py", "--workdir=w",
                    environment=env) == [
        "gcloud compute tpus tpu-vm ssh pod --zone=europe-west4-b --worker=all '--command=cd ~/rdpo_jax && "
        "nohup ~/rdpo_venv/bin/python -m rdpo_jax.train --config=c.py --workdir=w "
        "--config.distributed.auto=True > ~/rdpo_train.log 2>&1 &'"]
    assert _dry_run("tpu_vm.sh", "delete", "--queued", "--dry-run", environment=env) == [
        "gcloud compute tpus queued-resources delete pod --zone=europe-west4-b --force --quiet"]


def test_tpu_vm_mount():
    assert _dry_run("tpu_vm.sh", "mount", "--dry-run", "--name=n", "--zone=z", "--bucket=bkt") == [
        "gcloud compute tpus tpu-vm ssh n --zone=z --worker=all '--command=set -e; if ! command -v gcsfuse "
        ">/dev/null; then curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "
        "/usr/share/keyrings/cloud.google.asc >/dev/null; echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
        "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main\" | sudo tee "
        "/etc/apt/sources.list.d/gcsfuse.list >/dev/null; sudo apt-get update -q && sudo apt-get install -y -q "
        "gcsfuse; fi; sudo mkdir -p /gcs/bkt && sudo chown $USER /gcs/bkt; mountpoint -q /gcs/bkt || "
        "gcsfuse --implicit-dirs bkt /gcs/bkt'"]


@pytest.mark.parametrize("args, message", [
    (["train", "--zone=z"], "--name (or TPU_NAME) is required"),
    (["train", "--name=n", "--zone=z", "--dry-run"], "give the trainer's flags after --"),
    (["resize", "--name=n", "--zone=z"], "unknown stage resize"),
    (["mount", "--name=n", "--zone=z"], "mount: --bucket (or GCS_BUCKET) is required"),
    (["train", "--name=n", "--zone=z", "--typo=1"], "unknown option --typo=1"),
])
def test_tpu_vm_errors(args, message):
    assert message in _dry_run("tpu_vm.sh", *args, expect_rc=2)


def test_gpu_one_host_and_multi_node():
    train = ["--config=configs/llava15_7b_gpu.py:data=/data/pairs", "--workdir=/ckpt/run"]
    env = "env XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"
    assert _dry_run("gpu.sh", "--dry-run", "--gpus=4", "--", *train) == [
        f"{env} CUDA_VISIBLE_DEVICES=0,1,2,3 python3 -m rdpo_jax.train {' '.join(train)}"]
    assert _dry_run("gpu.sh", "--dry-run", "--", *train,
                    environment={"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.2"}) == [
        f"{env} python3 -m rdpo_jax.train {' '.join(train)} --config.distributed.coordinator=10.0.0.2:29500 "
        "--config.distributed.num_processes=2 --config.distributed.process_id=1"]
    assert _dry_run("gpu.sh", "--dry-run", "--slurm", "--python=/venv/bin/python", "--", *train) == [
        f"{env} /venv/bin/python -m rdpo_jax.train {' '.join(train)} --config.distributed.auto=True"]
    assert "needs --coordinator" in _dry_run("gpu.sh", "--nodes=2", "--", *train, expect_rc=2)
    assert "is not in 0..1" in _dry_run("gpu.sh", "--nodes=2", "--node_rank=2", "--coordinator=h:1", "--", *train,
                                        expect_rc=2)


def test_local_multiprocess_commands():
    lines = _dry_run("local_multiprocess.sh", "--dry-run", "--processes=3", "--devices_per_process=2",
                     "--port=4321", "--python=py", "--", "--config=configs/smoke.py:dir=/s", "--workdir=/w")
    assert lines == [
        "env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 py -m rdpo_jax.train "
        "--config=configs/smoke.py:dir=/s --workdir=/w --config.distributed.coordinator=127.0.0.1:4321 "
        f"--config.distributed.num_processes=3 --config.distributed.process_id={i}" for i in range(3)]
    assert "--processes=0: expected a positive integer" in _dry_run(
        "local_multiprocess.sh", "--processes=0", "--", "--config=c", expect_rc=2)


def test_local_multiprocess_stops_all_when_one_fails(tmp_path):
    """A process that fails (here: a config that does not exist) fails the script, with its log shown (in a
    log folder the script creates)."""
    proc = subprocess.run(["bash", "launch/local_multiprocess.sh", "--python=" + sys.executable,
                           f"--log_dir={tmp_path}/logs/new", "--", "--config=configs/absent.py", f"--workdir={tmp_path}/w"],
                          cwd=runs.ROOT, env=runs.env(str(tmp_path / "cache")), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "absent.py" in proc.stderr
    assert (tmp_path / "logs" / "new" / "process-1.log").exists()
