"""docs/results.md 9.29: the SR stage read other ways at sampling time, scored like a row of
`python -m cdm.evaluate` (drawn classes, N samples per seed, both feature spaces).

* An ensemble: the SR stages of several files, each a separate training run, average their
  predictions at every step. The cascade is the first file's (its base, samplers, classes); the
  others lend only their SR stage, which must take the same inputs. For v-prediction the average
  is exact in the sense of classifier_free (guidance.py): at fixed x_t, x0 and eps are affine in
  v, so averaging v averages both estimates.
* SR-only classifier-free guidance (--sr-cfg-scale w): the SR stage's output is
  (1 + w) out(y) - w out(null) (guidance.classifier_free), the base unguided; `--cfg-scale`
  of sample.py and cdm.evaluate guides every stage.
* Tiles: one SR stage evaluated on overlapping --tile x --tile windows (the patch size it trained
  on, so every GroupNorm and attention sees what it saw in training), each pixel the mean of the
  windows that hold it.

Sampled on the CPU in fp32, or with --bf16 in bf16 autocast, as `precision: auto` samples on a CPU
with native bf16 (which moved the published file's FDs by under 0.0005, docs/results.md 9.29).

    python docs/experiments/sr_ensemble.py A.pt B.pt C.pt --num-samples 10000 --seeds 0 --out ens.json
    python docs/experiments/sr_ensemble.py A.pt --tile 16 --stride 8 --num-samples 10000 --seeds 0 --out tiles.json
    python docs/experiments/sr_ensemble.py A.pt --sr-cfg-scale 0.3 --bf16 --num-samples 10000 --seeds 0 --out cfg.json
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, where cdm/ is
from cdm.cascade import load_cascade, sample_cascade
from cdm.classifier import DEFAULT_PATHS
from cdm.config import DATA_ROOT_ENV
from cdm.datasets import load_mnist
from cdm.errors import ArgumentParser, UserError, int_list, run_cli
from cdm.evaluate import FeatureSpace, cascade_row, mean_std
from cdm.guidance import classifier_free
from cdm.unet import upsample_low_res


class Wrapper(torch.nn.Module):
    """An SR network read another way, showing what sampling (cascade.py: num_classes, channels)
    and Tiled (upsample_mode) read of the network itself; wrappers nest."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.num_classes, self.channels, self.upsample_mode = model.num_classes, model.channels, model.upsample_mode


class Ensemble(Wrapper):
    """SR networks of several training runs as one: model(x, t, **cond) is the mean of theirs."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__(members[0])
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return torch.stack([m(x, t, **cond) for m in self.members]).mean(0)  # (B, C, H, W)


class Guided(Wrapper):
    """A conditional SR network under classifier-free guidance of weight w."""

    def __init__(self, model: torch.nn.Module, w: float):
        super().__init__(model)
        self.inner = model
        self.guided = classifier_free(model, w, model.num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.guided(x, t, **cond)


class Tiled(Wrapper):
    """An SR network evaluated on tile x tile windows `stride` apart, averaged where they overlap."""

    def __init__(self, model: torch.nn.Module, tile: int, stride: int):
        super().__init__(model)
        self.inner, self.tile, self.stride = model, tile, stride

    def forward(self, x: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor, **cond) -> torch.Tensor:
        size = x.shape[-1]
        low_res = upsample_low_res(low_res, size, self.upsample_mode)  # (B, C, H, W), as in training
        starts = range(0, size - self.tile + 1, self.stride)
        total, count = torch.zeros_like(x), torch.zeros_like(x[:1, :1])
        for i in starts:
            for j in starts:
                window = (..., slice(i, i + self.tile), slice(j, j + self.tile))
                total[window] += self.inner(x[window], t, low_res=low_res[window], **cond)
                count[window] += 1
        return total / count


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="two-stage cascade files; the first gives the base")
    parser.add_argument("--tile", type=int, default=0, help="evaluate the SR stage on tiles this size (0: whole)")
    parser.add_argument("--stride", type=int, default=8, help="the tiles' stride")
    parser.add_argument("--sr-cfg-scale", type=float, default=0.0, help="classifier-free guidance of the SR stage only")
    parser.add_argument("--bf16", action="store_true", help="sample in bf16 autocast (default: fp32)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int_list, default=[0])
    parser.add_argument("--out", required=True, help="results .json")
    args = parser.parse_args()
    cfg, stages, _ = load_cascade(args.checkpoints[0], "cpu")
    if len(stages) != 2:
        raise UserError(f"'{args.checkpoints[0]}' has {len(stages)} stages: this experiment takes two-stage cascades")
    members = [stages[1].model]
    for path in args.checkpoints[1:]:
        other = load_cascade(path, "cpu")[1]
        if len(other) != 2 or other[1].cfg.image_size != stages[1].cfg.image_size or \
                other[1].model.num_classes != stages[1].model.num_classes:
            raise UserError(f"'{path}': its SR stage does not take the inputs of '{args.checkpoints[0]}''s "
                            f"(two stages, {stages[1].cfg.image_size}x{stages[1].cfg.image_size}, "
                            f"{stages[1].model.num_classes} classes)")
        members.append(other[1].model)
    if args.tile and (args.tile > stages[1].cfg.image_size or (stages[1].cfg.image_size - args.tile) % args.stride):
        raise UserError(f"--tile {args.tile} --stride {args.stride}: the tiles must cover the "
                        f"{stages[1].cfg.image_size}x{stages[1].cfg.image_size} image exactly")
    if args.sr_cfg_scale and (not stages[1].model.num_classes or 1 in cfg.without_null_label):
        raise UserError(f"--sr-cfg-scale: the SR stage of '{args.checkpoints[0]}' has no learned null label "
                        f"(class-conditional with stages.1.model.label_dropout > 0)")
    stages[1].model = Ensemble(members) if len(members) > 1 else members[0]
    if args.sr_cfg_scale:
        stages[1].model = Guided(stages[1].model, args.sr_cfg_scale)
    if args.tile:
        stages[1].model = Tiled(stages[1].model, args.tile, args.stride)

    test_images, _ = load_mnist(os.environ.get(DATA_ROOT_ENV, "data"), True, 32, 1, train=False)
    spaces = [FeatureSpace.build(name, path, test_images) for name, path in DEFAULT_PATHS.items()]
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        samples = sample_cascade(stages, args.num_samples, torch.Generator().manual_seed(seed), batch_size=500,
                                 class_prior=cfg.data.class_prior, bf16=args.bf16)
        rows.append(cascade_row(spaces, samples, time.perf_counter() - start))
        print(f"seed {seed}: FD cnn32 {rows[-1]['fd_cnn32']:.4f}, resnet28 {rows[-1]['fd_resnet28']:.4f}", flush=True)
    result = {"checkpoints": args.checkpoints, "tile": args.tile, "stride": args.stride, "seeds": args.seeds,
              "sr_cfg_scale": args.sr_cfg_scale, "bf16": args.bf16,
              **mean_std(rows)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    run_cli(main)
