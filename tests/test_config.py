from pathlib import Path

import pytest

from cdm.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.sr.image_size % cfg.base.image_size == 0


def test_defaults_are_valid():
    load_config(None)


def test_override_sets_a_key_with_its_type():
    cfg = load_config(None, ["train.steps=200", "sr.optim.lr=3e-4", "base.model.attention_resolutions=[4, 2]"])
    assert cfg.train.steps == 200 and cfg.sr.optim.lr == 3e-4
    assert cfg.base.model.attention_resolutions == [4, 2]


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=5"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    (["data.dataset=svhn"], "config key 'data.dataset': expected mnist, fashion_mnist, cifar10, image_folder"),
    (["data.workers=-1"], "config key 'data.workers': expected >= 0"),
    (["trian.steps=5"], "unknown config key 'trian' (did you mean 'train'?)"),
    (["train.steps=ten"], "config key 'train.steps': expected int, got 'ten'"),
    (["train.steps=1.5"], "config key 'train.steps': expected int"),
    (["train.channels_last=3"], "config key 'train.channels_last': expected bool"),
    (["base.model.channel_mult=4"], "config key 'base.model.channel_mult': expected a list of int"),
    (["base.model.attention_resolutions=[16]"], "base.model.attention_resolutions': expected resolutions this UNet reaches [8, 4, 2]"),
    (["sr.image_size=36"], "sr.image_size"),
    (["sr.image_size=12"], "'sr.image_size': expected a multiple of base.image_size (8)"),
    (["augment.max_level=1001"], "'augment.max_level': expected in [0, base T = 1000]"),
    (["augment.aug_level=300"], "'augment.aug_level': expected in [0, augment.max_level = 200]"),
    (["augment.aug_mode=half"], "'augment.aug_mode': expected truncated or non_truncated"),
    (["base.model.norm_groups=48"], "'base.model.norm_groups': expected a divisor"),
    (["base.diffusion.schedule=sigmoid"], "'base.diffusion.schedule': expected linear or cosine"),
    (["sr.sampler.steps=0"], "'sr.sampler.steps': expected in [1"),
    (["base.optim.lr=-1"], "'base.optim.lr': expected > 0"),
    (["sr.optim.crop_size=10"], "'sr.optim.crop_size': expected 0 or a size <= 32 divisible by 4"),
    (["train.compile=off"], "'train.compile': expected str, got False"),
    (["device=tpu"], "'device': expected auto, cpu, cuda or cuda:N"),
    (["train.steps"], "expected key.path=value"),
])
def test_bad_values_raise_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_data_root_from_environment(monkeypatch):
    cfg = load_config(None, ["data.root=/from/config"])
    monkeypatch.delenv("CDM_DATA_ROOT", raising=False)
    assert cfg.data_root == "/from/config"
    monkeypatch.setenv("CDM_DATA_ROOT", "/from/env")
    assert cfg.data_root == "/from/env"
