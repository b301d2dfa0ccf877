"""User-facing errors: one clear line and a non-zero exit instead of a traceback."""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake in the user's input (paths, flags, data). Reported as one line, exit code 2."""


def cli_entry(fn: F) -> F:
    """Wrap a console-script ``main`` so that a :class:`UserError` prints ``error: ...`` and exits with 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as one ``error:`` line (exit 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")
