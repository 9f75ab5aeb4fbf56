"""The ``covidxray`` command line: one module per command, assembled here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="covidxray",
    help="Synthetic chest X-rays (GANs), classifiers, lung segmentation and evaluation for COVID-19 research.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each module owns one command; heavy imports (torch) happen inside the commands,
    # so that `covidxray --help` stays fast.
    from covidxray.cli import demo, evaluate, gif, models, prepare, sample, segment, train

    app.command("prepare")(prepare.prepare_cmd)
    app.command("train")(train.train_cmd)
    app.command("sample")(sample.sample_cmd)
    app.command("segment")(segment.segment_cmd)
    app.command("gif")(gif.gif_cmd)
    app.command("evaluate")(evaluate.evaluate_cmd)
    app.command("models")(models.models_cmd)
    app.command("demo")(demo.demo_cmd)


_register()


def main() -> None:  # console-script entry point
    app()
