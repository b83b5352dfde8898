import pytest
import torch

from cdm import metrics
from cdm.classifier import MnistClassifier
from cdm.data import downsample


def test_frechet_distance_of_identical_sets_is_zero_and_grows_with_shift():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2000, 16, generator=gen, dtype=torch.float64)
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0, abs=1e-6)
    shifted = feats + 1.0  # mean moves by 1 in each of 16 dims: FD = 16
    assert metrics.frechet_distance(feats, shifted) == pytest.approx(16, rel=1e-6)
    scaled = feats * 2  # same mean, covariance 4x: FD = tr(S + 4S - 2*2S) = tr(S) ~ 16
    assert metrics.frechet_distance(feats, scaled) == pytest.approx(16, rel=0.1)


def test_precision_recall():
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(500, 8, generator=gen)
    assert metrics.precision_recall(real, real.clone()) == (1.0, 1.0)
    far = torch.randn(500, 8, generator=gen) + 100
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:1].repeat(500, 1) + 1e-3 * torch.randn(500, 8, generator=gen)  # mode collapse
    precision, recall = metrics.precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.05


def test_class_statistics():
    uniform = torch.eye(10).repeat(10, 1)  # 100 confident predictions, 10 per class
    stats = metrics.class_statistics(uniform)
    assert stats["class_kl"] == pytest.approx(0, abs=1e-9) and stats["confidence"] == 1.0
    one_class = torch.zeros(50, 10)
    one_class[:, 3] = 1
    assert metrics.class_statistics(one_class)["class_kl"] == pytest.approx(torch.log(torch.tensor(10.)).item())


def test_psnr_ssim_consistency():
    gen = torch.Generator().manual_seed(2)
    hr = torch.rand(4, 1, 32, 32, generator=gen) * 2 - 1
    assert (metrics.psnr(hr, hr) == 100).all()  # identical images: capped, not inf
    noisy = (hr + 0.5 * torch.randn(hr.shape, generator=gen)).clamp(-1, 1)
    assert (metrics.psnr(noisy, hr) < 20).all()
    torch.testing.assert_close(metrics.ssim(hr, hr), torch.ones(4))
    assert (metrics.ssim(noisy, hr) < 0.9).all()
    lr = downsample(hr, 8)
    assert metrics.consistency(hr, lr).abs().max() < 1e-12  # an exact downsample
    assert (metrics.consistency(noisy, lr) > 0).all()


def test_classifier_features_shape():
    feats, probs = metrics.classifier_outputs(MnistClassifier().eval(), torch.zeros(3, 1, 32, 32))
    assert feats.shape == (3, 128) and probs.shape == (3, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
