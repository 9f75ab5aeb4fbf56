"""Training-progress animation from a run's fixed-latent snapshots."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from covidxray.errors import CovidXrayError
from covidxray.utils import atomic_path

SNAPSHOT_RE = re.compile(r"^epoch_(\d+)\.png$")


def _family_of_run(run_dir: Path) -> str | None:
    """The model family of a run folder, from its config.yaml (None when it cannot be told)."""
    try:
        import yaml

        from covidxray.models.registry import get_model

        model = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["model"]
        return get_model(model["name"] if isinstance(model, dict) else model).family
    except Exception:  # no or unreadable config, unknown model: say nothing about the family
        return None


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of ``samples/epoch_XXXX.png`` in epoch order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CovidXrayError(f"run folder {run_dir} does not exist", "Pass the folder printed by `covidxray train`")
    found = []
    samples = run_dir / "samples"
    if samples.is_dir():
        for p in samples.iterdir():
            m = SNAPSHOT_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    if not found:
        family = _family_of_run(run_dir)
        if family not in (None, "gan"):
            raise CovidXrayError(f"run folder {run_dir} is a {family} run: it has no sample grids to animate",
                                 "`covidxray gif` animates the snapshots of GAN runs")
        raise CovidXrayError(
            f"run folder {run_dir} has no snapshots (samples/epoch_XXXX.png)",
            "Train it first (`covidxray train`); snapshots are saved every train.snapshot_every epochs",
        )
    return sorted(found)


def _label_frame(img: Image.Image, text: str, font) -> Image.Image:
    strip = max(16, img.height // 24)
    frame = Image.new("L", (img.width, img.height + strip), 0)
    frame.paste(img, (0, strip))
    ImageDraw.Draw(frame).text((4, (strip - font.size) // 2 if hasattr(font, "size") else 2), text, fill=255, font=font)
    return frame


def make_gif(run_dir: str | os.PathLike, out: str | os.PathLike, fps: float = 5.0, every: int = 1,
             max_side: int = 1024, hold_last: float = 1.0) -> tuple[Path, int]:
    """Write an animated, looping GIF of the run's snapshots, each frame labelled with its epoch.

    Args:
        run_dir: run folder with ``samples/epoch_XXXX.png``.
        out: GIF path.
        fps: frames per second.
        every: keep every K-th snapshot (the last one is always kept).
        max_side: frames larger than this are downscaled (keeps the GIF small enough for a README).
        hold_last: extra seconds the last frame stays on screen.

    Returns:
        The GIF path and the number of frames.
    """
    import imageio.v3 as iio

    if fps <= 0:
        raise CovidXrayError(f"--fps must be > 0, got {fps}")
    if every < 1:
        raise CovidXrayError(f"--every must be >= 1, got {every}")
    snaps = list_snapshots(run_dir)
    chosen = snaps[::every]
    if chosen[-1] != snaps[-1]:
        chosen.append(snaps[-1])
    frames = []
    size = None
    for epoch, path in chosen:
        try:
            with Image.open(path) as im:
                img = im.convert("L")
        except OSError as exc:
            raise CovidXrayError(f"snapshot {path} is unreadable ({exc})", "Delete it and run gif again") from None
        if max(img.size) > max_side:
            scale = max_side / max(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
        size = size or img.size
        if img.size != size:  # a snapshot of another grid: fit it to the first frame's size
            img = img.resize(size, Image.LANCZOS)
        font = ImageFont.load_default(size=max(10, img.height // 32))
        frames.append(np.asarray(_label_frame(img, f"epoch {epoch}", font)))
    durations = [1000.0 / fps] * len(frames)
    durations[-1] += 1000.0 * hold_last
    out = Path(out)
    if out.suffix.lower() != ".gif":
        raise CovidXrayError(f"output {out} must end in .gif")
    with atomic_path(out) as tmp:
        # One frame: a plain number (Pillow's single-image GIF writer does not take a list of durations).
        duration = durations if len(frames) > 1 else durations[0]
        iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=duration, loop=0)
    return out, len(frames)
