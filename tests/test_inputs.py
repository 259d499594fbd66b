"""Inputs that were accepted but could not be honoured: BN groups of one value per channel,
and a colour-jitter strength too small to change a pixel."""
import pytest
import torch

from densecl_fast.bn import convert_to_group_bn, set_bn_groups
from densecl_fast.config import ConfigError, check_environment, load_config
from densecl_fast.model import ResNetTrunk
from helpers import PRETRAIN, load_script

pretrain_cli = load_script("pretrain_cli_inputs", PRETRAIN)


# ---- BN over one value per channel (item 7) -----------------------------------------------------------

def test_groups_of_one_image_at_a_1x1_c5_make_the_trunk_blind_to_its_input():
    """Why the configurations below are refused: one value per channel normalises to the BN bias (up to
    rounding), so C5 is the same for every image."""
    torch.manual_seed(0)
    trunk = convert_to_group_bn(ResNetTrunk("resnet18")).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        set_bn_groups(trunk, 4)  # groups of 1 image
        blind = trunk(x)
        set_bn_groups(trunk, 2)  # groups of 2 images: the features depend on the images again
        seeing = trunk(x)
    assert blind.shape[-2:] == (1, 1)
    spread = lambda c5: (c5 - c5[:1]).abs().max().item()  # noqa: E731
    assert spread(blind) < 1e-3 < 0.1 < spread(seeing) and seeing.abs().mean() > 0.1


@pytest.mark.parametrize("overrides, words", [
    (["model.bn_group_size=1", "data.image_size=32"], ["model.bn_group_size=1", "data.image_size=32", "C5 is 1x1"]),
    (["model.bn_group_size=0", "data.image_size=32", "optim.batch_size=1", "model.queue_len=64"],
     ["optim.batch_size=1", "model.bn_group_size=0", "data.image_size=32"]),
])
def test_one_value_per_channel_is_refused_before_any_work(tmp_path, capsys, overrides, words):
    with pytest.raises(ConfigError, match="1 value per channel"):
        load_config("smoke", overrides)
    rc = pretrain_cli.main(["--config", "smoke", *overrides, f"train.out_dir={tmp_path / 'run'}",
                            "train.tensorboard=false"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


def test_the_per_process_batch_decides_under_several_processes():
    cfg = load_config("smoke", ["model.bn_group_size=0", "data.image_size=32", "optim.batch_size=2",
                                "model.queue_len=64"])  # one process: BN over 2 images, allowed
    with pytest.raises(ConfigError, match=r"optim.batch_size=2 on 2 process\(es\) with model.bn_group_size=0"):
        check_environment(cfg, world_size=2)


@pytest.mark.parametrize("overrides", [["model.bn_group_size=2", "data.image_size=32"],   # 2 values
                                       ["model.bn_group_size=1", "data.image_size=33"],   # C5 2x2 (rounded up)
                                       ["model.bn_group_size=1", "data.image_size=64"]])
def test_more_than_one_value_per_channel_is_accepted(overrides):
    load_config("smoke", overrides)
