"""The shipped accelerate configs in recipes/accelerate/ load with accelerate's own config loader and say what they
claim (process counts, FSDP version, ZeRO stage, multi-node placeholders). No training; part of the default suite:

    pytest tests/test_accelerate_configs.py
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
EXPECTED = {  # file -> distributed_type
    "single_gpu.yaml": "NO", "ddp.yaml": "MULTI_GPU", "fsdp2.yaml": "FSDP", "zero2.yaml": "DEEPSPEED",
    "zero3.yaml": "DEEPSPEED", "multi_node.yaml": "MULTI_GPU", "cpu_ddp.yaml": "MULTI_GPU",
}


def _load(name: str):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(CONFIG_DIR / name))
    assert isinstance(config, ClusterConfig)
    return config


def test_every_shipped_config_is_known():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_is_documented(name):
    config = _load(name)
    assert str(config.distributed_type).split(".")[-1] == EXPECTED[name]
    assert config.num_processes >= 1 and config.num_machines >= 1
    text = (CONFIG_DIR / name).read_text()
    assert f"accelerate launch --config_file recipes/accelerate/{name}" in text  # the exact launch command
    assert "stages" not in yaml.safe_load(text)  # not a recipe


def test_single_gpu_is_one_bf16_process():
    config = _load("single_gpu.yaml")
    assert config.num_processes == 1 and config.mixed_precision == "bf16" and not config.use_cpu


def test_fsdp2_uses_fsdp_version_2():
    fsdp = _load("fsdp2.yaml").fsdp_config
    assert int(fsdp["fsdp_version"]) == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.parametrize("name,stage", [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_zero_stage(name, stage):
    deepspeed = _load(name).deepspeed_config
    assert deepspeed["zero_stage"] == stage
    if stage == 3:
        assert deepspeed["zero3_save_16bit_model"] is True  # whole weights on save, for from_pretrained


def test_multi_node_has_documented_placeholders():
    config = _load("multi_node.yaml")
    assert config.num_machines > 1 and config.num_processes % config.num_machines == 0
    assert config.machine_rank == 0 and config.main_process_ip and config.main_process_port
    text = (CONFIG_DIR / "multi_node.yaml").read_text()
    assert "machine_rank: 0  # PLACEHOLDER" in text and "main_process_ip: 10.0.0.1  # PLACEHOLDER" in text


def test_cpu_ddp_starts_two_cpu_processes():
    config = _load("cpu_ddp.yaml")
    assert config.num_processes == 2 and config.use_cpu is True and config.mixed_precision == "no"
