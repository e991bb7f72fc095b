"""The attention tile table: one rule per call, chosen by architecture, dtype, head dim and N."""

import pytest
import torch

from regkern.ops.attention import configs
from regkern.ops.dispatch import compile_target

CUDA = torch.device("cuda")


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_every_role_has_a_configuration_for_every_call(arch):
    with compile_target(arch):
        for role in configs.ROLES:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for d in (32, 64, 72, 128, 256):
                    for N in (1, 197, 261, 1374, 100_000):
                        cfg = configs.tile_config(role, CUDA, dtype, d, N)
                        assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.num_warps >= 1 and cfg.num_stages >= 1


def test_first_matching_rule_wins_and_hopper_gets_its_own_tiles():
    with compile_target(90):
        assert configs.tile_config("forward", CUDA, torch.bfloat16, 64, 261) == configs.TileConfig(64, 128, 4, 3)
        assert configs.tile_config("forward", CUDA, torch.bfloat16, 64, 1374) == configs.TileConfig(128, 128, 8, 3)
        # each Hopper warpgroup owns 64 keys of the dK/dV tile
        cfg = configs.tile_config("backward_dkdv", CUDA, torch.bfloat16, 64, 1374)
        assert cfg.block_n == 64 * (cfg.num_warps // 4)
    with compile_target(80):
        assert configs.tile_config("forward", CUDA, torch.bfloat16, 64, 261) == configs.TileConfig(64, 64, 4, 3)


def test_cpu_tensors_get_the_interpreter_tiles_and_bad_roles_are_refused():
    cpu = torch.device("cpu")
    assert configs.tile_config("forward", cpu, torch.float32, 64, 261) == configs.INTERPRETER_CONFIG
    with pytest.raises(ValueError, match="role"):
        configs.tile_config("fwd", cpu, torch.float32, 64, 261)
