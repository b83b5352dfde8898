"""Shared fixtures: the tiny config, pointed at a temporary output folder and the shared MNIST."""
import os
from pathlib import Path

import pytest

from cdm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if "CDM_DATA_ROOT" not in os.environ and SHARED_DATA.is_dir():
    os.environ["CDM_DATA_ROOT"] = str(SHARED_DATA)


@pytest.fixture
def tiny_cfg(tmp_path):
    """configs/tiny.yaml writing under tmp_path; MNIST from $CDM_DATA_ROOT (../shared/data)."""
    return load_config(ROOT / "configs" / "tiny.yaml", [f"out_dir={tmp_path}", "data.download=false"])
