"""What the command-line entry points (train, evaluate, compare) share: driver-config overrides and error exits.

Every CLI takes the driver's ``--set section.key=value`` overrides, and train/evaluate also
``--backend``; each flag of its own maps to one more override. Errors a user can fix (a missing
file, a bad value) end with ``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import backends

USER_ERRORS = (FileNotFoundError, ValueError)


def add_override_arguments(
    p: argparse.ArgumentParser, *, backend: bool = True, set_help: str = "override a config value (repeatable)"
) -> None:
    """``--set`` (repeatable) and, with ``backend``, ``--backend`` for the M-Hub and the prefix cache."""
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=set_help)
    if backend:
        p.add_argument("--backend", choices=backends.BACKEND_CHOICES, help="kernels for the M-Hub and the prefix cache")


def config_overrides(args: argparse.Namespace, flags: dict[str, object]) -> list[str]:
    """``--set`` items, then ``--backend`` as ``model.backend``, then ``key=value`` for every flag given (None: not given)."""
    overrides = list(args.set)
    if getattr(args, "backend", None):
        overrides.append(f"model.backend={args.backend}")
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    return overrides


def user_error(exc: Exception) -> int:
    """Report an error the user can fix and return the CLI's exit status for it."""
    print(f"error: {exc}", file=sys.stderr)
    return 2
