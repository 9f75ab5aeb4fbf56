"""``covidxray train``: train a registered model on a prepared folder (or resume a run)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from covidxray.cli._common import Number, console, user_errors
from covidxray.config.core import GENERIC_BOUNDS
from covidxray.errors import CovidXrayError


def _bounded(key: str) -> Number:
    """The parser of a flag that sets the integer config key ``key``: the schema's generic bound of it
    (families may narrow it further; the resolved config is validated as a whole)."""
    return Number(int, **GENERIC_BOUNDS[key].number_kwargs())


@user_errors
def train_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registered model (see `covidxray models`)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared folder (output of `covidxray prepare`)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", parser=_bounded("train.epochs"), help="Total epochs (with --resume: the new total)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", parser=_bounded("train.batch_size"), help="Images per step."),
    image_size: Optional[int] = typer.Option(None, "--image-size", parser=_bounded("data.image_size"), help="Input side in px (default: the prepared size). "
                                             "GANs: 64, 128 or 256, equal to the prepared size; classifiers: 64-299, "
                                             "resized on the device."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class subset, e.g. covid."),
    out: Optional[Path] = typer.Option(None, "--out", help="Parent folder of run folders (default: runs)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of config overrides."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Dotted override key=value, repeatable (e.g. train.batch_size=32)."),
    seed: Optional[int] = typer.Option(None, "--seed", parser=_bounded("train.seed"), help="Random seed (stored with the run)."),
    snapshot_every: Optional[int] = typer.Option(None, "--snapshot-every", parser=_bounded("train.snapshot_every"),
                                                 help="Save the fixed-latent grid every N epochs (train.snapshot_every)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from checkpoints/last.pt."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
) -> None:
    """Train MODEL on prepared data; a run folder runs/<id>-<model>/ collects everything."""
    from covidxray.train.loop import resume_run, start_run

    con = console()
    if resume is not None:
        extra = {"--model": model, "--batch-size": batch_size, "--image-size": image_size, "--classes": classes,
                 "--out": out, "--config": config, "--set": set_, "--seed": seed, "--snapshot-every": snapshot_every}
        given = [k for k, v in extra.items() if v]
        if given:
            raise CovidXrayError(
                f"{', '.join(given)} cannot change a run being resumed",
                "Only --epochs, --data and --device go with --resume; start a new run to change the rest",
            )
        if dry_run:
            from covidxray.checkpoint import load_checkpoint
            import yaml

            ckpt = load_checkpoint(resume, resume=True)
            con.print(yaml.safe_dump(ckpt["config"], sort_keys=False), highlight=False)
            return
        _, finished = resume_run(resume, epochs=epochs, data=str(data) if data else None, device=device, console=con)
        if not finished:
            raise typer.Exit(130)
        return

    if model is None:
        raise CovidXrayError("--model is required (or --resume RUN_DIR)", "List the models with `covidxray models`")
    from covidxray.config import resolve_config
    from covidxray.models.registry import get_model

    get_model(model)  # unknown names fail here, listing the valid ones
    flags = {
        "data": {"path": str(data.resolve()) if data else None, "image_size": image_size,
                 "classes": classes.split(",") if classes else None},
        "train": {"epochs": epochs, "batch_size": batch_size, "seed": seed, "device": device,
                  "snapshot_every": snapshot_every},
    }
    cfg = resolve_config(model, config, flags, set_)
    if out is not None:
        cfg.out = str(out)
    if dry_run:
        con.print(cfg.to_yaml(), highlight=False)
        return
    trainer, finished = start_run(cfg, console=con)
    if not finished:
        raise typer.Exit(130)
    if trainer.dist.is_main:  # torchrun: one line, not one per rank
        con.print(f"run folder: {trainer.run_dir}", highlight=False)
