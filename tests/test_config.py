from pathlib import Path

import pytest

from cdm.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    sizes = [stage.image_size for stage in cfg.stages]
    assert all(b > a and b % a == 0 for a, b in zip(sizes, sizes[1:]))
    assert cfg.stages[0].augment is None and all(s.augment is not None for s in cfg.stages[1:])


def test_defaults_are_valid():
    load_config(None)


def test_override_sets_a_key_with_its_type():
    cfg = load_config(None, ["train.steps=200", "stages.1.optim.lr=3e-4",
                             "stages.0.model.attention_resolutions=[4, 2]", "stages.1.augment.aug_level=7"])
    assert cfg.train.steps == 200 and cfg.stages[1].optim.lr == 3e-4
    assert cfg.base.model.attention_resolutions == [4, 2] and cfg.stages[1].augment.aug_level == 7


def test_a_stage_list_from_yaml_and_its_sr_defaults(tmp_path):
    path = tmp_path / "three.yaml"
    path.write_text("stages:\n  - {image_size: 8}\n  - {image_size: 16}\n"
                    "  - {image_size: 32, augment: {max_level: 100}}\n")
    cfg = load_config(path, ["stages.2.optim.batch_size=3"])
    assert [s.image_size for s in cfg.stages] == [8, 16, 32]
    assert cfg.stages[1].augment.max_level == 200  # an SR stage without augment: gets the defaults
    assert cfg.stages[2].augment.max_level == 100 and cfg.stages[2].optim.batch_size == 3
    assert cfg.base is cfg.stages[0] and cfg.trained_stages == [0, 1, 2]


def test_old_two_stage_keys_are_refused_with_the_new_layout():
    with pytest.raises(ConfigError, match="config key 'base': the cascade is now a list of stages"):
        load_config(None, ["base.optim.lr=1e-3"])


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=5"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    (["data.dataset=svhn"], "config key 'data.dataset': expected mnist, fashion_mnist, cifar10, image_folder"),
    (["data.workers=-1"], "config key 'data.workers': expected >= 0"),
    (["data.class_prior=[1, 1]"], "'data.class_prior': expected null (nothing in this cascade is class-conditional)"),
    (["data.class_prior=half"], "'data.class_prior': expected a list of float"),
    (["trian.steps=5"], "unknown config key 'trian' (did you mean 'train'?)"),
    (["train.steps=ten"], "config key 'train.steps': expected int, got 'ten'"),
    (["train.steps=1.5"], "config key 'train.steps': expected int"),
    (["train.channels_last=3"], "config key 'train.channels_last': expected bool"),
    (["stages.0.model.channel_mult=4"], "config key 'stages.0.model.channel_mult': expected a list of int"),
    (["stages.0.model.attention_resolutions=[16]"], "stages.0.model.attention_resolutions': expected resolutions this UNet reaches [8, 4, 2]"),
    (["stages.1.image_size=36"], "stages.1.image_size"),
    (["stages.0.model.patch_size=0"], "'stages.0.model.patch_size': expected >= 1, got 0"),
    (["stages.0.model.patch_size=4"], "'stages.0.image_size': expected divisible by patch_size * 2**(len(channel_mult)-1) = 16"),
    (["stages.0.model.patch_size=2", "stages.0.model.attention_resolutions=[8]"], "stages.0.model.attention_resolutions': expected resolutions this UNet reaches [4, 2, 1]"),
    (["stages.1.image_size=12"], "'stages.1.image_size': expected a multiple of stages.0.image_size (8)"),
    (["stages.1.augment.max_level=1001"], "'stages.1.augment.max_level': expected in [0, stages.0.diffusion.timesteps = 1000]"),
    (["stages.1.augment.aug_level=300"], "'stages.1.augment.aug_level': expected in [0, stages.1.augment.max_level = 200]"),
    (["stages.1.augment.aug_mode=half"], "'stages.1.augment.aug_mode': expected truncated or non_truncated"),
    (["stages.0.augment={max_level: 5}"], "'stages.0.augment': expected no augment section on the base stage"),
    (["stages.0.model.norm_groups=48"], "'stages.0.model.norm_groups': expected a divisor"),
    (["stages.0.diffusion.schedule=sigmoid"], "'stages.0.diffusion.schedule': expected linear or cosine"),
    (["stages.1.diffusion.noise_distribution=logit"], "'stages.1.diffusion.noise_distribution': expected uniform or lognormal"),
    (["stages.1.diffusion.p_std=0"], "'stages.1.diffusion.p_std': expected > 0"),
    (["stages.1.diffusion.log_snr_shift=.nan"], "'stages.1.diffusion.log_snr_shift': expected a number in [-10, 10]"),
    (["stages.1.diffusion.log_snr_shift=40"], "'stages.1.diffusion.log_snr_shift': expected a number in [-10, 10]"),
    (["stages.1.sampler.steps=0"], "'stages.1.sampler.steps': expected in [1"),
    (["stages.1.sampler.spacing=karras"], "'stages.1.sampler.spacing': expected uniform or quadratic"),
    (["stages.0.optim.lr=-1"], "'stages.0.optim.lr': expected > 0"),
    (["stages.1.optim.crop_size=10"], "'stages.1.optim.crop_size': expected 0 or a size <= 32 divisible by 4"),
    (["stages.0.optim.posthoc_ema_std=[0.05, 0.3]"], "'stages.0.optim.posthoc_ema_std': expected distinct relative stds in (0, 0.28]"),
    (["stages.5.optim.lr=1"], "'5' is not an index of this list (0..1)"),
    (["stages=[]"], "config key 'stages': expected a non-empty list of sections"),
    (["train.stages=[0, 2]"], "'train.stages': expected [] (all) or consecutive, ascending stage indices from [0, 1]"),
    (["train.stages=[1, 0]"], "'train.stages': expected [] (all) or consecutive"),
    (["train.compile=off"], "'train.compile': expected str, got False"),
    (["train.cuda_graphs=always"], "'train.cuda_graphs': expected auto or never"),
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
