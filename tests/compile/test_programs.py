"""The run's programs compiled by XLA:TPU for small topologies on this CPU host (libtpu): splash attention
goes through Mosaic (no interpreter), every layout and the Qwen patch buffers compile, memory is reported."""

import math

import jax
import pytest
from absl import flags

from configs import smoke
from rdpo_jax import config_checks, sharding, train
from rdpo_jax.compile import chips, programs, report


@pytest.fixture(autouse=True)
def _flags_parsed(tpu_env):
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _devices(topology, num_slices=1):
    return chips.devices(topology, num_slices)[2]


def _config(folder, **fields):
    config = smoke.get_config(f"dir={folder}" + (",family=qwen2_5_vl" if "qwen" in folder else ""))
    config.model.dtype = "bfloat16"
    for name, value in fields.items():
        group, field = name.split("__")
        config[group][field] = value
    return config


def _compile(config, topology, names=("train",), **options):
    devices = _devices(topology)
    built = programs.build(config, devices, names=names, **options)
    chip = chips.topology(topology)[1]
    return built, [report.compile_and_measure(p, chip, chip.hbm_gib) for p in built]


def test_attention_auto_is_decided_by_the_target_not_the_host(smoke_dir):
    """The same config traced for TPU chips holds the splash kernel; for this host's CPU devices, einsums."""
    config = _config(smoke_dir)
    assert config.model.attention == "auto"
    tpu = programs.build(config, _devices("v5p-8"), names=("train",))[0]
    cpu = programs.build(config, jax.devices()[:4], names=("train",))[0]
    assert "pallas_call" in str(tpu.traced.jaxpr)
    assert "pallas_call" not in str(cpu.traced.jaxpr)


def test_llava_shared_prefix_step_and_the_other_programs_on_v5p(smoke_dir):
    built, reports = _compile(_config(smoke_dir), "v5p-8", names=programs.PROGRAMS)
    assert [r["program"] for r in reports] == ["train", "eval", "ref_logps", "sample"]
    train = reports[0]
    assert train["mosaic_kernels"] > 0  # splash compiled by Mosaic, not interpreted
    for r in reports:
        assert r["fits"] and 0 < r["total"] < 2**30
        assert r["arguments"] > 0 and r["temporaries"] > 0
        assert r["matmul_flops"] > 0
    # the FSDP gradients are reduce-scattered into their shards (XLA:TPU's all-reduce-scatter fusion)
    assert train["collectives"]["reduce-scatter"]["count"] > 0
    assert train["model_flops"] < train["matmul_flops"] or built[0].model is None
    assert train["estimated_s"] > 0 and 0 < train["mfu"] < 1


def test_qwen_concat_layout_with_patch_buffers_on_v5e(qwen_smoke_dir):
    config = _config(qwen_smoke_dir, dpo__pair_layout="concat", mesh__fsdp=4, mesh__tensor=1, data__seq_buckets=(128,))
    built, (train,) = _compile(config, "v5e-4")
    assert "288 patches per row" in built[0].what  # the largest patch bucket
    assert train["mosaic_kernels"] > 0 and train["fits"] and train["temporaries"] > 0


def test_packed_multi_answer_rows_on_v6e(smoke_dir):
    config = _config(smoke_dir, dpo__pair_layout="multi_answer", data__groups_per_row=2, mesh__fsdp=4,
                     mesh__tensor=1)
    devices = _devices("v6e-4")
    built = programs.build(config, devices, names=("train",), all_buckets=True)
    assert [p.what for p in built] == ["4 rows of 48 tokens", "8 rows of 48 tokens"]  # ⌈8/2⌉ rows, then 8
    measured = report.compile_and_measure(built[0], chips.CHIPS["v6e"], 32)
    assert measured["mosaic_kernels"] > 0 and measured["fits"] and measured["pairs"] == 4 * 2 * 4


def test_two_slices_split_data_between_slices(smoke_dir):
    devices = _devices("v5p:2x2x1", num_slices=2)
    assert programs.hosts(devices) == 2  # one host of 4 chips in each slice
    config = _config(smoke_dir, mesh__data=2, mesh__fsdp=4, mesh__tensor=1)
    (train,) = programs.build(config, devices, names=("train",))
    grid = train.mesh.devices  # [data, fsdp, tensor]: each data index inside one slice
    assert [{d.slice_index for d in grid[i].ravel()} for i in range(2)] == [{0}, {1}]
    assert train.what == "8 rows of 48 tokens"


def _state_bytes(config, devices) -> int:
    """A run's train state per chip, from its abstract state (nothing compiled)."""
    mesh = sharding.make_mesh(config_checks.validate(config, num_devices=len(devices), num_processes=1), devices=devices)
    state = train.Setup(config, mesh).abstract
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))


def test_qlora_plans_like_a_full_run_and_holds_less(smoke_dir):
    """The ahead-of-time plan of a QLoRA config (nf4 base, adapters, reference = the base with adapters off)
    compiles with the dequantization inside; its state per chip is a fraction of full fine-tuning's."""
    config = _config(smoke_dir, lora__rank=4, lora__quantize="nf4", lora__block=16, dpo__reference="base",
                     model__param_dtype="bfloat16")
    built, (qlora,) = _compile(config, "v5p-8")
    assert "u8[" in str(built[0].traced.jaxpr)  # the nf4 codes are the program's arguments
    assert qlora["fits"] and qlora["mosaic_kernels"] > 0 and qlora["arguments"] > 0
    full, quantized = (_state_bytes(c, _devices("v5p-8")) for c in (_config(smoke_dir), config))
    # 0.23× here: the tiny smoke model's embeddings and vision tower stay bfloat16 (docs/benchmarks.md: 7B plans)
    assert quantized < 0.3 * full, (quantized, full)
