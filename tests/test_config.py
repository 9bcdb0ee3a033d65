import os

import pytest
import yaml

from ra3_jax.config import ConfigError, RunConfig, load_config

from .conftest import REPO


def test_shipped_configs_load_every_value_they_set():
    import glob

    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(f"{REPO}/configs/*.yaml"))
    assert {"tiny_cpu", "smollm2_135m_cpu", "ra3_tiny_cpu", "ra3_smollm2_cpu", "rlvr_smollm2"} <= set(names)
    default = RunConfig()
    for name in names:
        with open(f"{REPO}/configs/{name}.yaml", encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        cfg = load_config(f"{REPO}/configs/{name}.yaml")
        changed = 0
        for section, values in raw.items():
            for key, value in values.items():
                assert getattr(getattr(cfg, section), key) == value, f"{name}.yaml: {section}.{key}"
                changed += value != getattr(getattr(default, section), key)
        assert changed, f"{name}.yaml sets nothing but defaults"


def test_yaml_value_and_override_change_the_field(tmp_path):
    assert RunConfig().train.steps == 100
    assert load_config(f"{REPO}/configs/tiny_cpu.yaml").train.steps == 20  # from the file
    assert load_config(f"{REPO}/configs/tiny_cpu.yaml", ["train.steps=3"]).train.steps == 3  # the override wins
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*Did you mean 'lr'"):
        load_config(bad)


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
    cfg = load_config(None, ["policy.group_size=4", "policy.advantage=rloo", "policy.micro_batch=8"])
    assert (cfg.policy.group_size, cfg.policy.advantage, cfg.policy.micro_batch) == (4, "rloo", 8)
    for bad, msg in [
        ("policy.group_size=1", "at least 2 samples"),
        ("policy.advantage=ppo", "policy.advantage"),
        ("policy.micro_batch=-1", "micro_batch"),
        ("rlvr.timeout_s=0", "timeout_s"),
        ("policy.promts_per_step=4", "Did you mean 'prompts_per_step'"),
        ("ra3.eval_iwae_samples=-1", "eval_iwae_samples"),
        ("ra3.alpha=0.4", "alpha"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [bad])
