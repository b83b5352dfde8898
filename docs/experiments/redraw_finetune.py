"""docs/results.md 9.26: fine-tune a cascade's SR stage on low-res inputs redrawn by its own base.

The SR stage trains on true 8x8 digits but, in the cascade, reads the base's samples. Here a
share of each batch's true 8x8 inputs is noised to one of the base sampler's own late states
t0 and solved back to t = 0 by the base (its stored DPM-Solver++ states below t0, the true
label; SDEdit, Meng et al. 2022), so those inputs carry the base's artefacts while the target
stays the true 32x32 digit. --redraw 0 is the control: the same fine-tuning on true inputs.
The cascade's other augmentation (blur) and patches are the stage's own; the fine-tuning starts
from the file's EMA weights with a fresh AdamW, warm-up then cosine decay to zero, and an EMA of
decay 0.999 from those weights; the file is written with its SR EMA weights replaced.
--stage 0 fine-tunes the base alike instead (9.27: a second learning-rate cycle for it, on its
true 8x8 digits; no redraws).

    python docs/experiments/redraw_finetune.py output/pretrained/cdm_mnist_cpu_2h_b128.pt OUT.pt \
        --redraw 0.5 --states 39,89,159
"""
import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, where cdm/ is
from cdm.augment import blur_low_res, sr_cond
from cdm.cascade import Stage, load_cascade
from cdm.checkpoint import save_checkpoint
from cdm.data import downsample
from cdm.datasets import load_data
from cdm.diffusion import gaussian_noise
from cdm.ema import ema_update
from cdm.train import learning_rate, random_crop, stage_labels
from cdm.unet import upsample_low_res


@torch.no_grad()
def redraw(base: Stage, low_res: torch.Tensor, y: torch.Tensor, states: list[int],
           generator: torch.Generator) -> torch.Tensor:
    """True base-size images (n, C, h, w) noised to a base state t0 drawn from `states` and solved
    back by the base along its own sampler's states below t0 (DPM-Solver++(2M))."""
    t0 = states[int(torch.randint(len(states), (1,), generator=generator))]
    chain = [t for t in base.diffusion.timesteps(base.cfg.sampler.steps, -1, base.cfg.sampler.spacing) if t <= t0]
    n = low_res.shape[0]
    x = base.diffusion.q_sample(low_res, torch.full((n,), t0), gaussian_noise(low_res, generator))
    history = None
    for t, t_prev in zip(chain[:-1], chain[1:]):
        x, history = base.diffusion.dpm_solver_step(base.model, x, torch.full((n,), t), torch.full((n,), t_prev),
                                                    {"y": y}, base.cfg.sampler.clip_x0, history)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a two-stage class-conditional cascade file")
    parser.add_argument("out")
    parser.add_argument("--stage", type=int, choices=(0, 1), default=1, help="1: the SR stage, 0: the base")
    parser.add_argument("--redraw", type=float, default=0.5, help="share of each batch redrawn by the base")
    parser.add_argument("--states", default="39,89,159", help="base states t0 to redraw from (the sampler's own)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="default: the stage's optim.batch_size")
    parser.add_argument("--crop-size", type=int, help="SR patch size; default: the stage's optim.crop_size "
                        "(9.31: its image_size, whole images, as it samples)")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if args.stage == 0 and args.redraw:
        parser.error("--stage 0 fine-tunes the base on true digits: give --redraw 0")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    states = [int(s) for s in args.states.split(",")]

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    cfg, (base, sr), _ = load_cascade(args.checkpoint, "cpu")
    stage = (base, sr)[args.stage]
    if args.crop_size is not None and not (args.stage == 1 and 1 <= args.crop_size <= sr.cfg.image_size):
        parser.error(f"--crop-size is the SR stage's patch, 1 to {sr.cfg.image_size} with --stage 1, got {args.crop_size}")
    optim = dataclasses.replace(stage.cfg.optim, lr=args.lr, warmup_steps=args.warmup, lr_decay="cosine",
                                batch_size=args.batch_size or stage.cfg.optim.batch_size,
                                crop_size=args.crop_size or stage.cfg.optim.crop_size)
    schedule = dataclasses.replace(stage.cfg, optim=optim)  # warm-up, then cosine to zero
    model = stage.model.train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=optim.weight_decay, fused=True)
    data = load_data(cfg.data.dataset, cfg.data_root, cfg.data.download, sr.cfg.image_size, cfg.data.channels)
    aug, start = sr.cfg.augment, time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, schedule, args.steps)
        hr, y = data.batch(optim.batch_size, generator)  # (B, C, 32, 32), (B,)
        low_res = downsample(hr, base.cfg.image_size)  # (B, C, 8, 8)
        if args.stage == 0:  # the base learns the 8x8 digits themselves
            target, cond = low_res, {"y": stage_labels(y, base.cfg, generator)}
        else:
            if args.redraw > 0:
                chosen = torch.rand(len(y), generator=generator) < args.redraw  # (B,)
                if chosen.any():
                    low_res[chosen] = redraw(base, low_res[chosen], y[chosen], states, generator)
            z = blur_low_res(low_res, aug.blur_prob, aug.blur_sigma, generator)
            z = upsample_low_res(z, sr.cfg.image_size, sr.cfg.model.upsample_mode)  # (B, C, 32, 32)
            target, z = random_crop([hr, z], optim.crop_size, generator)
            cond = sr_cond(z, torch.zeros(len(y), dtype=torch.long), stage_labels(y, sr.cfg, generator))
        t = stage.diffusion.training_timesteps(len(y), generator)
        loss = stage.diffusion.training_loss(model, target, t, cond, gaussian_noise(target, generator)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        ema_update(ema, model, 0.999)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    ckpt = torch.load(args.checkpoint, weights_only=True)
    ckpt["stages"][args.stage]["ema"] = ema.state_dict()
    print("saved", save_checkpoint(ckpt, args.out))


if __name__ == "__main__":
    main()
