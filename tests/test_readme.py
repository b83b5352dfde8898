"""The README's and docs' commands cannot rot: the paths they name exist, and the sampling
commands on the published weights run as written (with a small --num-samples)."""
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT, run_in_process

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPO_PATH = re.compile(r"^(configs|output/pretrained|anchors|docs)/")


def commands(page: Path) -> list[str]:
    """Every `python ...` line of the page's bash blocks, continuations joined, comments cut."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith(("python ", "OMP_NUM_THREADS=1 python ")):
                found.append(line)
    return found


ALL = [(page.name, cmd) for page in PAGES for cmd in commands(page)]
SAMPLING = [(name, cmd) for name, cmd in ALL
            if cmd.startswith("python sample.py --checkpoint output/pretrained/")]


def test_the_pages_have_commands():
    assert len(ALL) > 30 and len(SAMPLING) >= 4


@pytest.mark.parametrize("page, cmd", ALL, ids=[f"{p}:{c[:60]}" for p, c in ALL])
def test_every_path_a_command_names_exists(page, cmd):
    for token in shlex.split(cmd):
        if REPO_PATH.match(token):
            assert list(ROOT.glob(token)), f"{page}: {token} does not exist"


@pytest.mark.parametrize("page, cmd", SAMPLING, ids=[f"{p}:{c[:70]}" for p, c in SAMPLING])
def test_sampling_commands_on_the_published_weights_run(page, cmd, tmp_path, capsys):
    args = shlex.split(cmd)[2:]
    for flag in ("--num-samples", "--out"):
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    small = "10" if "--class-grid" in args else "2"  # a class grid needs a row per digit
    proc = run_in_process("sample.py", *args, "--num-samples", small, "--out", str(tmp_path),
                          "--device", "cpu", capsys=capsys)
    assert (tmp_path / "samples.npz").is_file(), proc.stdout


BLOCKS = [(page.name, block) for page in PAGES for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)]
NEEDS_A_RUN = [(name, block) for name, block in BLOCKS
               if "train_mnist.py" in block or re.search(r"output/(?!pretrained/)[\w.-]+/checkpoint\.pt", block)]


@pytest.mark.parametrize("page, block", NEEDS_A_RUN, ids=[f"{p}:{b[:50]}" for p, b in NEEDS_A_RUN])
def test_blocks_that_train_or_need_a_run_say_how_long(page, block):
    """A reader must know before pasting it that a block trains (or needs a run's checkpoint)
    and for about how long: a comment in the block gives a time."""
    assert re.search(r"#.*\b\d[\d,.]*\s*(s|min|h)\b", block), f"{page}: this block states no time:\n{block}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_code_block_is_closed(page):
    """An unclosed fence turns the prose after it into code and the next block into prose, and
    the checks above then read the wrong lines: each opening fence meets a bare ``` first."""
    open_at = None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if not line.lstrip().startswith("```"):
            continue
        if open_at is None:
            open_at = number
        else:
            assert line.strip() == "```", f"{page.name}:{open_at}: block not closed before line {number}"
            open_at = None
    assert open_at is None, f"{page.name}:{open_at}: block never closed"
