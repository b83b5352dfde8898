"""Shared fixtures: the tiny config, pointed at a temporary output folder and the shared MNIST."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from cdm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if "CDM_DATA_ROOT" not in os.environ:  # CI's copy beside the clone, else the project's data/
    os.environ["CDM_DATA_ROOT"] = str(SHARED_DATA if SHARED_DATA.is_dir() else ROOT / "data")


def pytest_sessionstart(session):
    """A fresh clone with internet: fetch MNIST into $CDM_DATA_ROOT once, before any test (the
    tests themselves never download)."""
    from torchvision.datasets import MNIST
    root = os.environ["CDM_DATA_ROOT"]
    if not (Path(root) / "MNIST" / "raw").is_dir():
        for train in (True, False):
            MNIST(root, train=train, download=True)


@pytest.fixture
def tiny_cfg(tmp_path):
    """configs/tiny.yaml writing under tmp_path; MNIST from $CDM_DATA_ROOT (../shared/data)."""
    return load_config(ROOT / "configs" / "tiny.yaml", [f"out_dir={tmp_path}", "data.download=false"])


def run_script(*args, expect=0):
    """Run `python ARGS...` in the repository root like a user; assert its exit status."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc


def run_in_process(script, *args, expect=0, capsys):
    """Run a top-level script's __main__ (or, given "-m", a module's) in this process (no
    interpreter start-up: seconds faster than run_script) with these arguments; assert its exit
    status, return its output."""
    import runpy
    from types import SimpleNamespace
    module = args[0] if script == "-m" else None
    if module:
        args = args[1:]
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [module or script, *args]
    os.chdir(ROOT)  # relative paths in args mean what they mean to a user in the repository root
    code = 0
    try:
        if module:
            with warnings.catch_warnings():  # the module is imported already: rerun it as __main__
                warnings.simplefilter("ignore", RuntimeWarning)
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    out, err = capsys.readouterr()
    assert code == expect, out + err
    return SimpleNamespace(stdout=out, stderr=err, returncode=code)


def assert_one_line_error(proc, message):
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") <= 1  # at most a device note and the error line
    assert "%|" not in proc.stderr  # bad input is refused before any progress bar starts
