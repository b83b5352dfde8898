"""Conditioning augmentation for the super-resolution stage (CDM, Ho et al. 2021, section 4).

The SR stage is trained on real low-res images but, in the cascade, is fed the base stage's
samples, which carry the base model's artefacts. Corrupting the low-res conditioning during
training teaches the SR model to ignore those artefacts.

Representation of the augmentation level, used by every module: `aug_level` s is an integer
(LongTensor (B,)) in [0, T_base]. s = 0 means no noise; s >= 1 means the low-res image is noised
with the *base* stage's forward process to its state t = s - 1, i.e.
z_s = sqrt(abar_{s-1}) z_0 + sqrt(1 - abar_{s-1}) eps. Using the base schedule is what makes the
two sampling modes agree:
  * non-truncated: the base chain runs to z_0, then `noise_low_res` forward-corrupts it to z_s;
  * truncated: the base chain stops at state s - 1, whose output already is a sample of z_s.
Order (stated once, used by training and sampling): blur (training only) -> Gaussian noise at the
low resolution -> the UNet resizes to the SR size and concatenates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cdm.diffusion import GaussianDiffusion, gaussian_noise


def sample_aug_levels(batch: int, max_level: int, generator: torch.Generator | None,
                      device: torch.device) -> torch.Tensor:
    """Training levels s ~ Uniform{0, ..., max_level}, (B,) long."""
    return torch.randint(0, max_level + 1, (batch,), generator=generator, device=device)


def noise_low_res(low_res: torch.Tensor, aug_level: torch.Tensor, diffusion: GaussianDiffusion,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian conditioning augmentation: z_0 (B, C, h, w) -> z_s with the base forward process
    q(z_s | z_0); rows with s = 0 are returned unchanged."""
    z_s = diffusion.q_sample(low_res, (aug_level - 1).clamp(min=0), gaussian_noise(low_res, generator))
    return torch.where((aug_level > 0).view(-1, 1, 1, 1), z_s, low_res)


def blur_low_res(low_res: torch.Tensor, prob: float, sigma_range: list[float],
                 generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian blur augmentation (CDM section 4.2): with probability `prob` per example, blur
    with a 3x3 Gaussian kernel of sigma ~ U(sigma_range) (in low-res pixels). Training only."""
    B, C, H, W = low_res.shape
    device = low_res.device
    lo, hi = sigma_range
    sigma = lo + (hi - lo) * torch.rand(B, generator=generator, device=device)  # (B,)
    blurred = torch.rand(B, generator=generator, device=device) < prob  # (B,)
    offsets = torch.tensor([-1.0, 0.0, 1.0], device=device)
    kernel_1d = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))  # (B, 3)
    kernel_1d = kernel_1d / kernel_1d.sum(dim=1, keepdim=True)
    kernel = kernel_1d[:, :, None] * kernel_1d[:, None, :]  # (B, 3, 3)
    kernel = kernel.repeat_interleave(C, dim=0)[:, None]  # (B*C, 1, 3, 3)
    padded = F.pad(low_res.reshape(1, B * C, H, W), (1, 1, 1, 1), mode="replicate")
    out = F.conv2d(padded, kernel.to(low_res.dtype), groups=B * C).view(B, C, H, W)
    return torch.where(blurred.view(-1, 1, 1, 1), out, low_res)


def sr_cond(low_res: torch.Tensor, aug_level: torch.Tensor, labels: torch.Tensor | None = None
            ) -> dict[str, torch.Tensor]:
    """The SR stage's conditioning dict, the one shape used by training and both sampling modes.
    low_res: (B, C, h, w) already augmented to z_s; aug_level: (B,)."""
    cond = {"low_res": low_res, "aug_level": aug_level}
    if labels is not None:
        cond["y"] = labels
    return cond
