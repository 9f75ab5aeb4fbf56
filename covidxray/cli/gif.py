"""``covidxray gif``: animate a run's fixed-latent snapshots in epoch order."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from covidxray.cli._common import console, user_errors


@user_errors
def gif_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder (runs/<id>-<model>/)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="GIF path (default: RUN_DIR/progress.gif)."),
    fps: float = typer.Option(5.0, "--fps", help="Frames per second."),
    every: int = typer.Option(1, "--every", help="Use every K-th snapshot (the last is always used)."),
    max_side: int = typer.Option(1024, "--max-side", help="Downscale frames larger than this (pixels)."),
) -> None:
    """Build a looping GIF of the run's samples/epoch_XXXX.png, each frame labelled with its epoch."""
    from covidxray.gif import make_gif

    path, n = make_gif(run_dir, output or Path(run_dir) / "progress.gif", fps=fps, every=every, max_side=max_side)
    console().print(f"wrote {path} ({n} frames at {fps:g} fps)", highlight=False)
