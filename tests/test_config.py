import os

import pytest

from ra3_jax.config import ConfigError, load_config

from .conftest import REPO


def test_shipped_configs_load():
    import glob

    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(f"{REPO}/configs/*.yaml"))
    assert {"tiny_cpu", "smollm2_135m_cpu", "ra3_tiny_cpu", "ra3_smollm2_cpu", "rlvr_smollm2"} <= set(names)
    for name in names:
        cfg = load_config(f"{REPO}/configs/{name}.yaml")
        assert cfg.train.steps > 0


def test_overrides_are_typed():
    cfg = load_config(
        f"{REPO}/configs/tiny_cpu.yaml", ["optim.lr=1e-2", "train.steps=7", "model.qkv_bias=true", "data.source_dirs=a,b"]
    )
    assert cfg.optim.lr == 0.01 and cfg.train.steps == 7 and cfg.model.qkv_bias is True and cfg.data.source_dirs == ["a", "b"]


def test_unknown_key_is_an_error_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*Did you mean 'lr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        load_config(None, ["optimizer.lr=1"])


def test_bad_values():
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="rope_layout"):
        load_config(None, ["model.rope_layout=weird"])
    with pytest.raises(ConfigError, match="needs model.path"):
        load_config(None, ["model.init=gguf"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")


def test_rlvr_section_validation():
    cfg = load_config(None, ["rlvr.group_size=4", "rlvr.advantage=rloo", "rlvr.micro_batch=8"])
    assert (cfg.rlvr.group_size, cfg.rlvr.advantage, cfg.rlvr.micro_batch) == (4, "rloo", 8)
    for bad, msg in [
        ("rlvr.group_size=1", "at least 2 samples"),
        ("rlvr.advantage=ppo", "rlvr.advantage"),
        ("rlvr.micro_batch=-1", "micro_batch"),
        ("rlvr.timeout_s=0", "timeout_s"),
        ("rlvr.promts_per_step=4", "Did you mean 'prompts_per_step'"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [bad])
