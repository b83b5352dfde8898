"""The UNet used by both cascade stages (DDPM appendix B, improved as in guided-diffusion).

One class serves the base and the super-resolution (SR) stage. The SR model is the base model
plus two declared differences (CDM section 3, guided-diffusion `SuperResModel`):
  * `low_res_channels > 0`: the low-resolution image is resized to the stage size and
    concatenated on channels with x_t;
  * `aug_embed=True`: the conditioning-augmentation level s gets a sinusoidal embedding that is
    added to the time embedding (CDM section 4).
Class labels, when `num_classes > 0`, add a label embedding; label `num_classes` is the null
label reserved for classifier-free guidance. Every scalar conditioning signal (t, s, y) enters the
residual blocks through one place: the embedding `emb` that scale-shifts their second GroupNorm.
With `self_condition` the network also takes its own previous estimate of x0 as extra input
channels, concatenated like the low-res image (self-conditioning, Chen et al. 2022 section 3).
With `patch_size` p > 1 the network sees each p x p patch as one position with p*p times the
channels (pixel_unshuffle after the concatenations, pixel_shuffle after the output conv), so its
levels and attention resolutions count in patches (Hoogeboom et al. 2023, "simple diffusion").
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from cdm.config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim), as in Transformer/DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, dim)


def upsample_low_res(low_res: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize the low-res conditioning (B, C, h, w) to (B, C, size, size)."""
    if low_res.shape[-1] == size:
        return low_res
    return F.interpolate(low_res, size=(size, size), mode=mode, align_corners=False)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters so a residual branch (or the output) starts as the identity (zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class EmbedBlock(nn.Module):
    """Marker: a block whose forward takes the conditioning embedding as well."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EmbedSequential(nn.Sequential):
    """Sequential that hands `emb` only to the blocks that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, EmbedBlock) else layer(x)
        return x


class ResBlock(EmbedBlock):
    """GroupNorm-SiLU-conv, then adaptive GroupNorm: norm(h) * (1 + scale) + shift with
    (scale, shift) projected from emb, then SiLU-dropout-conv (zero-initialised), plus skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, in_ch), nn.SiLU(),
                                       nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.out_norm = nn.GroupNorm(groups, out_ch)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)  # (B, out, H, W)
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, out, 1, 1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions, with F.scaled_dot_product_attention."""

    def __init__(self, ch: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        H, W = x.shape[-2:]
        qkv = rearrange(self.qkv(self.norm(x)), "b (three h d) x y -> three b h (x y) d",
                        three=3, h=self.num_heads)  # 3 x (B, heads, HW, d)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, HW, d)
        out = rearrange(out, "b h (x y) d -> b (h d) x y", x=H, y=W)  # (B, C, H, W)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Learned 2x downsampling: 3x3 conv with stride 2."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Learned 2x upsampling: nearest-neighbour resize, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def res_block(cfg: ModelConfig, in_ch: int, out_ch: int) -> ResBlock:
    return ResBlock(in_ch, out_ch, 4 * cfg.channels, cfg.dropout, cfg.norm_groups)


def attention(cfg: ModelConfig, width: int) -> AttentionBlock:
    return AttentionBlock(width, cfg.num_heads, cfg.norm_groups)


class Encoder(nn.Module):
    """The UNet's first half: the time embedding, the input conv, per level `num_res_blocks`
    residual blocks (with attention at `attention_resolutions`) and a downsample, then the
    middle block (residual, attention unless mid_attention is off, residual). The UNet adds the decoder; the noisy classifier adds a pooling head."""

    def __init__(self, cfg: ModelConfig, image_size: int, in_channels: int):
        super().__init__()
        ch = self.base_channels = cfg.channels
        self.emb_dim = 4 * ch
        p = cfg.patch_size  # module-free folds: the same state_dict for any p; none at p = 1
        self.to_patches = nn.PixelUnshuffle(p) if p > 1 else nn.Identity()  # (B, C, H, W) -> (B, C p^2, H/p, W/p)
        self.from_patches = nn.PixelShuffle(p) if p > 1 else nn.Identity()  # and back
        self.time_embed = self.embed_mlp()
        self.input_conv = nn.Conv2d(in_channels * cfg.patch_size ** 2, ch, 3, padding=1)
        self.down = nn.ModuleList()
        # widths the decoder's skips will have; sizes count patches
        self.skip_widths, width, size = [ch], ch, image_size // cfg.patch_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res_block(cfg, width, ch * mult)]
                width = ch * mult
                if size in cfg.attention_resolutions:
                    layers.append(attention(cfg, width))
                self.down.append(EmbedSequential(*layers))
                self.skip_widths.append(width)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(EmbedSequential(Downsample(width)))
                self.skip_widths.append(width)
                size //= 2
        middle = [attention(cfg, width)] if cfg.mid_attention else []
        self.middle = EmbedSequential(res_block(cfg, width, width), *middle, res_block(cfg, width, width))
        self.width, self.size = width, size  # at the bottom of the U

    def embed_mlp(self) -> nn.Module:
        """Sinusoidal features (B, ch) -> embedding (B, 4 ch); one per conditioning scalar."""
        ch = self.base_channels
        return nn.Sequential(nn.Linear(ch, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim))

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(timestep_embedding(t, self.base_channels))  # (B, E)

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C_in, H, W) -> the middle block's output and the skips, shallowest first."""
        h = self.input_conv(self.to_patches(x))  # (B, ch, H / p, W / p)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        return self.middle(h, emb), skips


class UNet(Encoder):
    def __init__(self, cfg: ModelConfig, image_size: int, channels: int,
                 low_res_channels: int = 0, aug_embed: bool = False):
        self_cond_channels = channels if cfg.self_condition else 0
        super().__init__(cfg, image_size, channels + self_cond_channels + low_res_channels)
        self.image_size, self.channels = image_size, channels  # what it generates: (C, size, size)
        self.low_res_channels = low_res_channels
        self.self_condition = cfg.self_condition
        self.num_classes = cfg.num_classes
        self.upsample_mode = cfg.upsample_mode
        self.aug_embed = self.embed_mlp() if aug_embed else None
        self.label_embed = nn.Embedding(cfg.num_classes + 1, self.emb_dim) if cfg.num_classes else None

        # decoder: num_res_blocks + 1 blocks per level, each eating one skip, then an upsample
        ch, width, size, skip_widths = cfg.channels, self.width, self.size, list(self.skip_widths)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res_block(cfg, width + skip_widths.pop(), ch * mult)]
                width = ch * mult
                if size in cfg.attention_resolutions:
                    layers.append(attention(cfg, width))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(width))
                    size *= 2
                self.up.append(EmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(cfg.norm_groups, width), nn.SiLU(),
                                 zero_module(nn.Conv2d(width, channels * cfg.patch_size ** 2, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor | None = None,
                aug_level: torch.Tensor | None = None, y: torch.Tensor | None = None,
                x_self: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy image; t: (B,) steps in [0, T-1]; low_res: (B, C, h, w), given iff
        low_res_channels > 0; aug_level: (B,), given iff aug_embed; y: (B,) labels in
        [0, num_classes] (num_classes = null), given iff num_classes > 0; x_self: (B, C, H, W)
        the previous x0 estimate, only if self_condition (None: zeros, "no estimate yet")."""
        assert (low_res is not None) == (self.low_res_channels > 0), "low_res iff configured"
        assert x_self is None or self.self_condition, "x_self only with self_condition"
        assert (aug_level is not None) == (self.aug_embed is not None), "aug_level iff configured"
        assert (y is not None) == (self.label_embed is not None), "labels iff num_classes > 0"
        emb = self.embed_time(t)  # (B, E)
        if self.aug_embed is not None:
            emb = emb + self.aug_embed(timestep_embedding(aug_level, self.base_channels))
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)
        if self.self_condition:
            x = torch.cat([x, torch.zeros_like(x) if x_self is None else x_self.to(x.dtype)], dim=1)
        if low_res is not None:
            low_res = upsample_low_res(low_res, x.shape[-1], self.upsample_mode)
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)  # (B, C [+ C] + C_lr, H, W)
        h, skips = self.encode(x, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)  # (B, C_h + C_skip, H / p, W / p)
        return self.from_patches(self.out(h))  # (B, C, H, W)


def build_unet(cfg: ModelConfig, image_size: int, channels: int, super_res: bool) -> UNet:
    """The base UNet, or with super_res the SR UNet (low-res concat + aug-level embedding)."""
    return UNet(cfg, image_size, channels, low_res_channels=channels if super_res else 0,
                aug_embed=super_res)
