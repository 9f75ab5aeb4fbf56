"""``covidxray gif``: animate a run's fixed-latent snapshots in epoch order."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from covidxray.cli._common import Number, console, user_errors
from covidxray.infer.gif import MAX_FPS, MIN_SIDE


@user_errors
def gif_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder (runs/<id>-<model>/)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="GIF path (default: RUN_DIR/progress.gif); an existing .gif is "
                                               "replaced, anything else refused."),
    fps: float = typer.Option(5.0, "--fps", parser=Number(float, gt=0, le=MAX_FPS),
                              help=f"Frames per second, > 0 and <= {MAX_FPS:g} (frames of 10 ms or more)."),
    every: int = typer.Option(1, "--every", parser=Number(int, ge=1),
                              help="Use every K-th snapshot (the last is always used)."),
    max_side: int = typer.Option(1024, "--max-side", parser=Number(int, ge=MIN_SIDE),
                                 help=f"Downscale frames larger than this (pixels, >= {MIN_SIDE})."),
) -> None:
    """Build a looping GIF of the run's samples/epoch_XXXX.png, each frame labelled with its epoch.

    The output must end in .gif: an existing .gif is replaced (atomically), anything else - a folder, a
    file of another kind, a missing or read-only folder - is refused, so no other file is overwritten.
    """
    from covidxray.infer.gif import make_gif

    path, n = make_gif(run_dir, output or Path(run_dir) / "progress.gif", fps=fps, every=every, max_side=max_side)
    console().print(f"wrote {path} ({n} frames at {fps:g} fps)", highlight=False)
