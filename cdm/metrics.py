"""Metrics for samples and for super-resolution.

Sample quality uses the features of the project's evaluation networks (cdm.classifier), one
feature space each:
  * classifier-feature Fréchet distance (FD, the FID formula on these features: not Inception
    FID, and biased upwards at small N, so always report N beside it);
  * precision and recall on k-NN feature manifolds (Kynkäänniemi et al. 2019);
  * the predicted-class histogram, its KL divergence from uniform, and mean confidence.
Super-resolution (SR3, Saharia et al. 2021): PSNR and SSIM against the ground truth, and
consistency = MSE between the downsampled output and its low-res input. All images in [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cdm.data import downsample


@torch.inference_mode()
def classifier_outputs(model, images: torch.Tensor, batch_size: int = 250
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float64, class probabilities (N, 10)) for images (N, C, 32, 32) in [-1, 1];
    in channels-last batches of 250, the fastest layout and size for these CNNs on a CPU."""
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(images[i:i + batch_size].float().contiguous(memory_format=torch.channels_last))
        feats.append(f.double())
        probs.append(model.head(f).softmax(dim=1))
    return torch.cat(feats), torch.cat(probs)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) for features (N, D)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T  # S_a^1/2
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def kth_neighbour_radius(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row, (N,)."""
    radii = []
    for i in range(0, len(x), 1000):
        d = torch.cdist(x[i:i + 1000], x)  # (b, N); includes the zero self-distance
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def inside_balls(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each point, whether it lies inside at least one ball (centre, radius), (N,) bool."""
    inside = []
    for i in range(0, len(points), 1000):
        d = torch.cdist(points[i:i + 1000], centres)  # (b, M)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision = share of fake
    samples inside the real manifold (union of k-NN balls), recall = the converse. real_radii:
    the real set's k-NN radii, when already computed (they depend on the real set alone)."""
    if real_radii is None:
        real_radii = kth_neighbour_radius(real, k)
    precision = inside_balls(fake, real, real_radii).float().mean().item()
    recall = inside_balls(real, fake, kth_neighbour_radius(fake, k)).float().mean().item()
    return precision, recall


def class_statistics(probs: torch.Tensor) -> dict[str, object]:
    """Predicted-class histogram (fractions), its KL from uniform (nats), mean confidence."""
    hist = torch.bincount(probs.argmax(1), minlength=10).double() / len(probs)
    kl = (hist * (hist.clamp(min=1e-12) * 10).log()).sum().item()
    return {"class_hist": [round(v, 4) for v in hist.tolist()], "class_kl": kl,
            "confidence": probs.max(1).values.mean().item()}


def psnr(pred: torch.Tensor, target: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2), capped at max_db, (N,)."""
    mse = (pred.float() - target.float()).square().flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp(min=1e-30))).clamp(max=max_db)


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with a Gaussian window, on [0, 1] intensities, (N,)."""
    x, y = (pred.float() + 1) / 2, (target.float() + 1) / 2
    C = x.shape[1]
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(C, 1, window, window)  # (C, 1, w, w)

    def blur(z):
        return F.conv2d(z, kernel, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def consistency(images: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
    """SR3 consistency: MSE between downsample(images) and the low-res input, per image (N,)."""
    return (downsample(images.float(), low_res.shape[-1]) - low_res.float()).square().flatten(1).mean(1)

