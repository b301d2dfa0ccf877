"""User-facing errors: one clear line and a non-zero exit instead of a traceback."""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from nnunetv2_hiendmae.presets import CHECKPOINT_FORMAT

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake in the user's input (paths, flags, data). Reported as one line, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal after saving its work; the message says what was saved and how to continue.
    Exits with 128 + the signal's number, as the shell reports a process the signal ended. ``quiet``: exit without
    printing, for the ranks of a torchrun job other than the one that says it."""

    def __init__(self, message: str, signum: int, quiet: bool = False):
        super().__init__(message)
        self.exit_code, self.quiet = 128 + signum, quiet


def cli_entry(fn: F) -> F:
    """Wrap a console-script ``main`` so that a :class:`UserError` prints ``error: ...`` and exits with 2, and an
    interruption prints one line (:class:`Interrupted`'s, or ``interrupted``) and exits with 130 or its own code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Interrupted as e:
            if not e.quiet:
                print(f"interrupted: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as one ``error:`` line (exit 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def _pretraining_checkpoint_given_to_nnunet(exc: BaseException, tb: TracebackType | None) -> str | None:
    """The file, if ``exc`` is nnU-Net's ``-pretrained_weights`` loader failing on one of our pretraining
    checkpoints (it reads ``network_weights``, which only nnU-Net's training checkpoints have)."""
    if not isinstance(exc, KeyError) or exc.args != ("network_weights",):
        return None
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame if tb is not None else None
    if frame is None or not frame.f_code.co_filename.endswith("load_pretrained_weights.py"):
        return None
    saved = frame.f_locals.get("saved_model")
    return str(frame.f_locals.get("fname")) if isinstance(saved, dict) and saved.get("format") == CHECKPOINT_FORMAT \
        else None


def one_line_errors_in_nnunet_commands() -> None:
    """In nnU-Net's own commands that run our trainers (``nnUNetv2_train``, ``nnUNetv2_predict``, ...), report a
    :class:`UserError`, and a pretraining checkpoint given to ``-pretrained_weights``, as one ``error:`` line instead
    of a traceback. Chains the interpreter's hook; installed once, by the module nnU-Net finds our trainers in."""
    previous = sys.excepthook
    if getattr(previous, "one_line_user_errors", False):
        return

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        checkpoint = _pretraining_checkpoint_given_to_nnunet(exc, tb)
        if checkpoint is not None:
            print(f"error: -pretrained_weights {checkpoint} is a nnunetv2_hiendmae pretraining checkpoint, not an "
                  f"nnU-Net training checkpoint; its encoder reaches nnU-Net through plans: nnUNetv2_hiendmae_plan -d "
                  f"DATASET -pt {checkpoint}, then nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerHiEndMAE "
                  f"-p nnUNetPlans_HiEndMAE (without -pretrained_weights)", file=sys.stderr)
        elif issubclass(exc_type, UserError):
            print(f"error: {exc}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    hook.one_line_user_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook
