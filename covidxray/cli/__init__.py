"""The ``covidxray`` command line: one module per command, assembled here."""

from __future__ import annotations

import signal
import sys


def _interrupted_while_starting(signum, frame):  # Ctrl-C before a command has started: nothing to stop or keep
    sys.stderr.write("interrupted: nothing was started\n")
    sys.exit(130)


try:  # the imports below take a second or two; a Ctrl-C in them is a quiet exit 130, not a traceback
    _sigint = signal.signal(signal.SIGINT, _interrupted_while_starting)
except ValueError:  # not the main thread (imported by a library user): leave the handlers alone
    _sigint = None

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402


class OneLineErrors(TyperGroup):
    """The command group, with usage errors (a bad option value, a missing argument) printed as one
    ``error:`` line naming the fix, like every other input error, instead of a usage box (exit 2)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            sys.exit(130)
        except Exception as exc:  # usage errors: a bad option value, no such option, a missing argument...
            if not _is_click_error(exc):
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `covidxray`: the help was printed
                sys.exit(0)
            from covidxray.cli._common import fail

            sys.exit(fail(f"{exc.format_message()} (see --help)").exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


def _is_click_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__)


app = typer.Typer(
    cls=OneLineErrors,
    name="covidxray",
    help="Synthetic chest X-rays (GANs), classifiers, lung segmentation and evaluation for COVID-19 research.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each module owns one command; heavy imports (torch) happen inside the commands,
    # so that `covidxray --help` stays fast.
    from covidxray.cli import demo, evaluate, gif, models, prepare, sample, segment, study, train

    app.command("prepare")(prepare.prepare_cmd)
    app.command("train")(train.train_cmd)
    app.command("sample")(sample.sample_cmd)
    app.command("segment")(segment.segment_cmd)
    app.command("gif")(gif.gif_cmd)
    app.command("evaluate")(evaluate.evaluate_cmd)
    app.command("study")(study.study_cmd)
    app.command("models")(models.models_cmd)
    app.command("demo")(demo.demo_cmd)


_register()
if _sigint is not None:  # the commands handle Ctrl-C themselves (user_errors, the training loop's handlers)
    signal.signal(signal.SIGINT, _sigint)


def main() -> None:  # console-script entry point
    app()
