import pytest
import torch

from cdm.config import ModelConfig
from cdm.unet import AttentionBlock, build_unet

SMALL = ModelConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4],
                    num_heads=2, norm_groups=8)


def randomise(model):
    """Zero-initialised layers make the output 0 at init; give every weight a value."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("channels", [1, 3])
def test_base_and_sr_output_shapes(channels):
    base = randomise(build_unet(SMALL, 8, channels, super_res=False))
    sr = randomise(build_unet(SMALL, 32, channels, super_res=True))
    t = torch.tensor([0, 999])
    out = base(torch.randn(2, channels, 8, 8), t)
    assert out.shape == (2, channels, 8, 8)
    out = sr(torch.randn(2, channels, 32, 32), t, low_res=torch.randn(2, channels, 8, 8),
             aug_level=torch.tensor([0, 50]))
    assert out.shape == (2, channels, 32, 32)
    assert out.abs().sum() > 0


def test_sr_accepts_patches_with_resized_conditioning():
    sr = build_unet(SMALL, 32, 1, super_res=True)
    out = sr(torch.randn(2, 1, 16, 16), torch.tensor([3, 4]), low_res=torch.randn(2, 1, 16, 16),
             aug_level=torch.tensor([1, 2]))
    assert out.shape == (2, 1, 16, 16)


def test_patches_fold_into_channels_and_back():
    """patch_size 2: a 16x16 stage runs its levels at 8x8 and 4x4 (where SMALL's attention sits)
    with 4x the input and output channels, and still maps (B, C, 16, 16) to (B, C, 16, 16); an SR
    stage folds its low-res input with x_t, on whole images and on patches."""
    cfg = ModelConfig(**{**SMALL.__dict__, "patch_size": 2})
    base = randomise(build_unet(cfg, 16, 3, super_res=False))
    assert base.input_conv.in_channels == 12 and base.out[-1].out_channels == 12
    assert any(isinstance(m, AttentionBlock) for m in base.down.modules())  # at 4x4 positions
    out = base(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]))
    assert out.shape == (2, 3, 16, 16) and out.abs().sum() > 0
    sr = randomise(build_unet(cfg, 32, 1, super_res=True))
    assert sr.input_conv.in_channels == 8  # (x_t, low-res) x 2 x 2
    for size in (32, 16):
        out = sr(torch.randn(2, 1, size, size), torch.tensor([3, 4]), low_res=torch.randn(2, 1, 8, 8),
                 aug_level=torch.tensor([1, 2]))
        assert out.shape == (2, 1, size, size)


def test_mid_attention_off_makes_the_unet_fully_convolutional():
    """model.mid_attention: false removes the one attention block an SR UNet without
    attention_resolutions has; the default keeps it (old checkpoints hold its weights)."""
    cfg = ModelConfig(channels=8, channel_mult=[1, 2], num_res_blocks=1, norm_groups=8, num_heads=2)
    with_attention = build_unet(cfg, 32, 1, super_res=True)
    without = build_unet(ModelConfig(**{**cfg.__dict__, "mid_attention": False}), 32, 1, super_res=True)
    assert any(isinstance(m, AttentionBlock) for m in with_attention.modules())
    assert not any(isinstance(m, AttentionBlock) for m in without.modules())


def test_output_is_zero_at_init():
    model = build_unet(SMALL, 8, 1, super_res=False)
    assert torch.count_nonzero(model(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]))) == 0


def test_conditioning_given_iff_configured():
    base = build_unet(SMALL, 8, 1, super_res=False)
    sr = build_unet(SMALL, 32, 1, super_res=True)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([5])
    with pytest.raises(AssertionError, match="low_res"):
        base(x, t, low_res=torch.randn(1, 1, 8, 8))
    with pytest.raises(AssertionError, match="low_res"):
        sr(torch.randn(1, 1, 32, 32), t)
    with pytest.raises(AssertionError, match="aug_level"):
        sr(torch.randn(1, 1, 32, 32), t, low_res=torch.randn(1, 1, 8, 8))
    with pytest.raises(AssertionError, match="labels"):
        base(x, t, y=torch.tensor([1]))


def test_embeddings_change_the_output():
    """Time, aug level and label each reach the network."""
    cfg = ModelConfig(**{**SMALL.__dict__, "num_classes": 10})
    sr = randomise(build_unet(cfg, 32, 1, super_res=True)).eval()
    x, lr = torch.randn(1, 1, 32, 32), torch.randn(1, 1, 8, 8)

    def run(t, s, y):
        return sr(x, torch.tensor([t]), low_res=lr, aug_level=torch.tensor([s]), y=torch.tensor([y]))

    ref = run(10, 0, 3)
    assert not torch.allclose(ref, run(500, 0, 3))
    assert not torch.allclose(ref, run(10, 100, 3))
    assert not torch.allclose(ref, run(10, 0, 10))  # 10 = the null label


def test_self_condition_adds_the_previous_estimate_as_input():
    cfg = ModelConfig(**{**SMALL.__dict__, "self_condition": True})
    model = randomise(build_unet(cfg, 8, 3, super_res=False)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    assert model.input_conv.in_channels == 6
    none = model(x, t)
    torch.testing.assert_close(none, model(x, t, x_self=torch.zeros_like(x)))  # None means zeros
    assert not torch.allclose(none, model(x, t, x_self=torch.randn_like(x)))
    with pytest.raises(AssertionError, match="x_self"):
        build_unet(SMALL, 8, 3, super_res=False)(x, t, x_self=x)
