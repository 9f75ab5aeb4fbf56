"""Shared CLI plumbing: one-line user errors (exit 2), interrupts, consoles."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import typer

from covidxray.errors import CovidXrayError
from covidxray.utils import make_console

F = TypeVar("F", bound=Callable)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def fail(message: str) -> "typer.Exit":
    """Print ``error: message`` on stderr (one line) and return an Exit(2) to raise."""
    from rich.markup import escape

    err = make_console(stderr=True)
    # escaped: a message may hold brackets that rich would take for markup (pip install 'covidxray[fid]')
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_USER_ERROR)


def user_errors(func: F) -> F:
    """Decorate a command: CovidXrayError -> one line on stderr + exit 2; Ctrl-C -> exit 130.

    Programming errors are not caught: they keep their traceback (exit 1).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CovidXrayError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            make_console(stderr=True).print(
                "interrupted: nothing half-written was left; run the same command again to resume",
                highlight=False,
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def console():
    """The stdout console for progress and tables (made per call, never at import)."""
    return make_console(stderr=False)
