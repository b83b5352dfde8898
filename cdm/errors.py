"""User-facing errors: one clear line and exit code 2, never a traceback; argument types."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad config, bad file, bad argument)."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(); print a UserError as one line on stderr and exit with code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: ...`, exit code 2), like UserError."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers, e.g. 0,25,50."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def scale(text: str) -> float:
    """argparse type: a guidance scale, a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a scale >= 0, got {text!r}")
    return value


def scale_list(text: str) -> list[float]:
    """argparse type: comma-separated scales >= 0, e.g. 0,1,3."""
    return [scale(v) for v in text.split(",")]
