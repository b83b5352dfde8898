"""The benchmark's plumbing (never its timings: those are printed by python -m cdm.bench)."""
from dataclasses import replace

import pytest
import torch

from cdm.bench import bench_model, stage_cond
from cdm.unet import build_unet


@pytest.mark.parametrize("classes", [0, 10])
def test_bench_times_every_kind_of_stage(tiny_cfg, classes):
    """cdm.bench builds each stage's conditioning (SR input, labels) and times a train and a
    sampling step: a class-conditional stage must get labels (it once got none and crashed)."""
    cpu = torch.device("cpu")
    for index, stage in enumerate(tiny_cfg.stages):
        stage = replace(stage, model=replace(stage.model, num_classes=classes))
        model = build_unet(stage.model, stage.image_size, 1, index > 0)
        row = bench_model(f"stage{index}", model, 8, 8, 1, 2,
                          lambda n, hw: stage_cond(stage, index > 0, n, 1, hw, cpu),
                          cpu, False, steps=1, sample_batch=2, sample_steps=2)
        assert row["ms_per_step"] > 0 and row["gflops_per_image"] > 0 and row["sample_ms_per_denoise_step"] > 0
