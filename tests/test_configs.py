"""Kernel configurations chosen before anything compiles (CPU only: pure arithmetic)."""

import pytest
import torch

from inductor_flex.lowering import configs

HEAD_DIMS = [8, 16, 64, 80, 128, 192, 256]


@pytest.fixture(params=["sm90", "sm80", "other"])
def arch(request, monkeypatch):
    monkeypatch.setattr(configs, "architecture", lambda device: request.param)
    return request.param


def _backward(dtype, head_dim, autotune, mods_read_tensors=True):
    rounded = max(16, 1 << (head_dim - 1).bit_length())
    return rounded, configs.backward_configs(torch.device("cuda"), dtype, rounded, rounded, autotune=autotune,
                                             mods_read_tensors=mods_read_tensors)


@pytest.mark.parametrize("autotune", [False, True], ids=["default", "max_autotune"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
def test_backward_configs_fit_shared_memory(arch, head_dim, dtype, autotune):
    rounded, chosen = _backward(dtype, head_dim, autotune)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert chosen and len(set(chosen)) == len(chosen)
    for config in chosen:
        assert configs.backward_fits_shared_memory(config, rounded, rounded, itemsize, arch), config


@pytest.mark.parametrize("autotune", [False, True], ids=["default", "max_autotune"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
def test_float32_backward_configs_stay_in_the_register_budget(arch, head_dim, autotune):
    """float32 tiles all live in registers; over the budget Triton's code was wrong on the H200."""
    rounded, chosen = _backward(torch.float32, head_dim, autotune)
    for config in chosen:
        used = configs.backward_registers_per_thread(config, rounded, rounded, 4)
        assert used <= configs._FLOAT32_REGISTER_BUDGET, (config, used)


@pytest.mark.parametrize("autotune", [False, True], ids=["default", "max_autotune"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
def test_float32_forward_configs_stay_in_the_register_budget(arch, head_dim, autotune):
    rounded = max(16, 1 << (head_dim - 1).bit_length())
    chosen = configs.forward_configs(torch.device("cuda"), torch.float32, rounded, rounded, autotune=autotune,
                                     mods_read_tensors=True)
    assert chosen and len(set(chosen)) == len(chosen)
    for config in chosen:
        assert configs.fits_shared_memory(config, rounded, rounded, 4, arch), config
        used = configs.forward_registers_per_thread(config, rounded, rounded, 4)
        assert used <= configs._FLOAT32_REGISTER_BUDGET, (config, used)


def test_the_config_that_computed_wrong_gradients_gets_more_warps(monkeypatch):
    """H200, float32, D128: (32, 64, 64, 32) with 4 warps gave wrong dQ; 8 warps were right."""
    monkeypatch.setattr(configs, "architecture", lambda device: "sm90")
    _, chosen = _backward(torch.float32, 128, autotune=False)
    broken = configs.BackwardConfig(32, 64, 64, 32, 4, 1)
    assert broken not in chosen
    assert configs.BackwardConfig(32, 64, 64, 32, 8, 1) in chosen


def test_low_precision_configs_keep_their_warps(monkeypatch):
    """The register rule is float32's: bf16/fp16 dots read their operands from shared memory."""
    monkeypatch.setattr(configs, "architecture", lambda device: "sm90")
    _, chosen = _backward(torch.bfloat16, 256, autotune=False, mods_read_tensors=False)
    assert chosen == [configs._DEFAULT_BACKWARD[("sm90", 256, True)]]


@pytest.mark.parametrize("head_dim, tile, expected", [
    (128, 128, (8, 3)),  # the config's own tiles: its own warps and stages
    (128, 64, (4, 2)),   # shrunk to 64-blocks at D128: half the warps, two stages (measured faster)
    (64, 64, (4, 3)),    # shrunk at D64: three stages stay (measured faster there)
    (96, 64, (4, 2)),    # head dims of the D128 bucket follow D128
])
def test_backward_launch_for_shrunk_tiles(monkeypatch, head_dim, tile, expected):
    monkeypatch.setattr(configs, "architecture", lambda device: "sm90")
    rounded, (config, *_) = _backward(torch.bfloat16, head_dim, autotune=False, mods_read_tensors=False)
    assert (config.block_m2, config.block_n1, config.num_stages) == (128, 128, 3)
    launch = configs.backward_launch(config, tile, tile, torch.device("cuda"), torch.bfloat16, rounded, rounded)
    assert launch == expected


def test_backward_launch_keeps_float32_stages(monkeypatch):
    monkeypatch.setattr(configs, "architecture", lambda device: "sm90")
    config = configs.BackwardConfig(32, 64, 64, 32, 8, 2)
    assert configs.backward_launch(config, 32, 32, torch.device("cuda"), torch.float32, 128, 128) == (4, 2)
