import pytest
import torch

from cdm.augment import blur_low_res, noise_low_res, sample_aug_levels, sr_cond
from cdm.cascade import Stage, sample_cascade
from cdm.config import AugmentConfig, DiffusionConfig, ModelConfig, SamplerConfig, StageConfig
from cdm.diffusion import GaussianDiffusion
from cdm.unet import build_unet

C = 0.6  # the constant image the oracle base model "knows"


def test_level_zero_leaves_low_res_unchanged():
    d = GaussianDiffusion(DiffusionConfig())
    lr = torch.rand(4, 1, 8, 8) * 2 - 1
    levels = torch.tensor([0, 0, 30, 0])
    out = noise_low_res(lr, levels, d, torch.Generator().manual_seed(0))
    assert torch.equal(out[[0, 1, 3]], lr[[0, 1, 3]])
    assert not torch.allclose(out[2], lr[2])


def test_levels_drawn_uniformly_in_range():
    levels = sample_aug_levels(20000, 200, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert levels.min() == 0 and levels.max() == 200
    assert levels.float().mean().item() == pytest.approx(100, abs=2)


def test_blur_probability_and_mean_preservation():
    gen = torch.Generator().manual_seed(0)
    lr = torch.rand(64, 1, 8, 8, generator=gen)
    assert torch.equal(blur_low_res(lr, 0.0, [0.4, 0.6], gen), lr)
    flat = torch.full((2, 3, 8, 8), 0.25)
    torch.testing.assert_close(blur_low_res(flat, 1.0, [0.4, 0.6], gen), flat)  # kernel sums to 1
    blurred = blur_low_res(lr, 1.0, [0.4, 0.6], gen)
    assert not torch.allclose(blurred, lr) and blurred.var() < lr.var()  # blur smooths
    changed = (blur_low_res(lr, 0.5, [0.4, 0.6], gen) != lr).flatten(1).any(1).float().mean()
    assert 0.3 < changed.item() < 0.7


def oracle_base(d: GaussianDiffusion):
    """A base UNet whose forward predicts v for the clean image x0 = C everywhere."""
    model = build_unet(ModelConfig(channels=8, channel_mult=[1], norm_groups=8), 2, 1, super_res=False)

    def forward(x, t, **cond):
        x0 = torch.full_like(x, C)
        return d.v_target(x0, t, d.predict_eps_from_x0(x, t, x0))

    model.forward = forward
    return model


def recording_sr(seen: list):
    """An SR UNet that records the conditioning it is given and outputs zeros."""
    model = build_unet(ModelConfig(channels=8, channel_mult=[1], norm_groups=8), 4, 1, super_res=True)

    def forward(x, t, low_res, aug_level):
        seen.append((low_res.clone(), aug_level.clone()))
        return torch.zeros_like(x)

    model.forward = forward
    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_truncated_and_non_truncated_give_the_same_z_s(sampler):
    """The base chain stopped at state s - 1 must hand over z_s ~ q(z_s | z_0) exactly as the
    forward corruption of a finished z_0 does: the schedules of base and augmentation line up."""
    d = GaussianDiffusion(DiffusionConfig(timesteps=1000, schedule="cosine"))
    sampler_cfg = SamplerConfig(name=sampler, steps=1000 if sampler == "ddpm" else 50)
    base = Stage(0, StageConfig(image_size=2, sampler=sampler_cfg), oracle_base(d), d)
    s, n = 150, 3000
    abar = d.alpha_bar[s - 1].item()
    for mode in ("truncated", "non_truncated"):
        seen = []
        sr_cfg = StageConfig(image_size=4, sampler=SamplerConfig(steps=1),
                             augment=AugmentConfig(aug_level=s, aug_mode=mode))
        sr = Stage(1, sr_cfg, recording_sr(seen), GaussianDiffusion(DiffusionConfig(timesteps=10)), d)
        out = sample_cascade([base, sr], n, torch.Generator().manual_seed(0), batch_size=n)
        z_s, levels = seen[0]
        assert (levels == s).all()
        assert z_s.mean().item() == pytest.approx(abar ** 0.5 * C, abs=0.02), mode
        assert z_s.var().item() == pytest.approx(1 - abar, rel=0.08), mode
        torch.testing.assert_close(out.outputs[0], torch.full_like(out.outputs[0], C))  # clean estimate
        torch.testing.assert_close(out.low_res[1], z_s)


def test_sr_cond_carries_labels_only_when_given():
    lr, s = torch.zeros(2, 1, 8, 8), torch.tensor([1, 2])
    assert set(sr_cond(lr, s)) == {"low_res", "aug_level"}
    assert set(sr_cond(lr, s, torch.tensor([3, 4]))) == {"low_res", "aug_level", "y"}
