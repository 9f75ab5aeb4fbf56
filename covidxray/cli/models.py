"""``covidxray models``: list the model registry."""

from __future__ import annotations

from covidxray.cli._common import console, user_errors


@user_errors
def models_cmd() -> None:
    """List registered models: name, family, paper and one line each."""
    from rich.table import Table

    from covidxray.models.registry import list_models

    table = Table(title="covidxray models")
    for col in ("name", "family", "paper", "summary"):
        table.add_column(col, overflow="fold")
    for spec in list_models():
        table.add_row(spec.name, spec.family, spec.paper, spec.summary)
    console().print(table)
