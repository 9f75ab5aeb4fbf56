"""Shared CLI plumbing: one-line user errors (exit 2), interrupts, consoles."""

from __future__ import annotations

import functools
import math
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
            func(*args, **kwargs)  # a command's value is never its exit code
        except CovidXrayError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            make_console(stderr=True).print(
                "interrupted: nothing half-written was left; run the same command again to resume",
                highlight=False,
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


class Number:
    """A command-line number that must be finite and in a declared range (one place for every numeric
    option: ``typer.Option(5.0, parser=Number(float, gt=0, le=100))``); anything else is a usage
    error (exit 2, one line)."""

    def __init__(self, kind: type = float, *, ge: float | None = None, gt: float | None = None,
                 le: float | None = None, lt: float | None = None):
        self.kind, self.ge, self.gt, self.le, self.lt = kind, ge, gt, le, lt
        self.__name__ = kind.__name__  # typer names the parameter's type after the parser

    def describe(self) -> str:
        lo = f"> {self.gt:g}" if self.gt is not None else (f">= {self.ge:g}" if self.ge is not None else "")
        hi = f"< {self.lt:g}" if self.lt is not None else (f"<= {self.le:g}" if self.le is not None else "")
        what = "a whole number" if self.kind is int else "a finite number"
        return what + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "")

    def __call__(self, value):
        if isinstance(value, self.kind) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = self.kind(str(value).strip())
            except ValueError:
                raise typer.BadParameter(f"{value!r} is not {self.describe()}")
        ok = math.isfinite(number) and not (
            (self.ge is not None and number < self.ge) or (self.gt is not None and number <= self.gt)
            or (self.le is not None and number > self.le) or (self.lt is not None and number >= self.lt))
        if not ok:
            raise typer.BadParameter(f"{value!r} is not {self.describe()}")
        return number


def console():
    """The stdout console for progress and tables (made per call, never at import)."""
    return make_console(stderr=False)


def _sampler_name(value):
    from covidxray.models.diffusion import SAMPLERS

    if value not in SAMPLERS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(SAMPLERS)}")
    return value


# A diffusion model's sampler options, shared by `sample` and `evaluate` (any other model refuses them).
STEPS_OPTION = typer.Option(None, "--steps", help="Diffusion models: sampler steps (Heun: 2 x steps - 1 network "
                            "evaluations, Euler and dpm2m: steps; default: the run's edm.steps).",
                            parser=Number(int, ge=1, le=1000))
GUIDANCE_OPTION = typer.Option(None, "--guidance", help="Diffusion models: classifier-free guidance w (1 = the "
                               "conditional model, 0 = unconditional; other values cost two evaluations a step; "
                               "default: the run's edm.guidance).", parser=Number(float, ge=0, le=20))
SAMPLER_OPTION = typer.Option(None, "--sampler", help="Diffusion models: heun | euler | dpm2m (DPM-Solver++(2M)) "
                              "(default: the run's edm.sampler).", parser=_sampler_name)
