"""The ``covidxray`` command line: one module per command, assembled here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="covidxray",
    help="Synthetic chest X-rays (GANs), lung segmentation and evaluation for COVID-19 research.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Imported lazily so that `covidxray --help` stays fast and each module owns its command.
    from covidxray.cli import prepare

    app.command("prepare")(prepare.prepare_cmd)


_register()


def main() -> None:  # console-script entry point
    app()
