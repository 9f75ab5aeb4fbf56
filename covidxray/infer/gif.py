"""Training-progress animation from a run's fixed-latent snapshots."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import yaml

from covidxray.errors import CovidXrayError
from covidxray.utils import atomic_path

SNAPSHOT_RE = re.compile(r"^epoch_(\d+)\.png$")

#: Most frames per second: GIF frame delays are whole centiseconds, and browsers slow anything under 20 ms;
#: 100 fps (10 ms frames) is the format's limit.
MAX_FPS = 100.0
#: Smallest --max-side: frames below this cannot show the grid or its epoch label.
MIN_SIDE = 16


def _model_of_run(run_dir: Path) -> str | None:
    """The model name of a run folder, from its config.yaml (None when it cannot be told)."""
    try:
        model = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["model"]
        return str(model["name"] if isinstance(model, dict) else model)
    except Exception:  # no or unreadable config: say nothing about the model
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
        model = _model_of_run(run_dir)
        raise CovidXrayError(
            f"run folder {run_dir}{f' ({model})' if model else ''} has no snapshots (samples/epoch_XXXX.png)",
            "Train it first (`covidxray train`): generators save them every train.snapshot_every epochs; "
            "classifiers and segmenters write none",
        )
    return sorted(found)


def _label_frame(img, text: str, font):
    from PIL import Image, ImageDraw  # local: PIL stays out of `import covidxray.cli`, which imports this module

    strip = max(16, img.height // 24)
    frame = Image.new("L", (img.width, img.height + strip), 0)
    frame.paste(img, (0, strip))
    ImageDraw.Draw(frame).text((4, (strip - font.size) // 2 if hasattr(font, "size") else 2), text, fill=255, font=font)
    return frame


def check_output(out: str | os.PathLike) -> Path:
    """The GIF path ``out``, refused (one line) unless a GIF can be written there without losing a user's file.

    The rule: ``out`` must end in ``.gif`` and must not be a folder; its folder must exist and be
    writable. An existing ``.gif`` there is replaced (atomically: the old GIF or the new one, never half of
    one); anything else is refused, so a user's file of another kind is never overwritten.
    """
    out = Path(out)
    if out.is_dir():
        raise CovidXrayError(f"output {out} is a folder", f"Name a .gif file, e.g. -o {out / 'progress.gif'}")
    if out.suffix.lower() != ".gif":
        if out.exists() or out.is_symlink():
            raise CovidXrayError(f"output {out} exists and is not a .gif: gif replaces only a .gif",
                                 "Name a .gif file, e.g. -o progress.gif")
        raise CovidXrayError(f"output {out} must end in .gif", "Name a .gif file, e.g. -o progress.gif")
    parent = out.parent
    if not parent.exists():
        raise CovidXrayError(f"output folder {parent} does not exist", "Create it first or choose another -o")
    if not parent.is_dir():
        raise CovidXrayError(f"output folder {parent} is not a folder", "Choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CovidXrayError(f"output folder {parent} is not writable", "Choose another -o")
    if out.exists() and not out.is_file():
        raise CovidXrayError(f"output {out} exists and is not a file", "Choose another -o")
    return out


def make_gif(run_dir: str | os.PathLike, out: str | os.PathLike, fps: float = 5.0, every: int = 1,
             max_side: int = 1024, hold_last: float = 1.0) -> tuple[Path, int]:
    """Write an animated, looping GIF of the run's snapshots, each frame labelled with its epoch.

    ``out`` must end in ``.gif``: an existing ``.gif`` there is replaced atomically; a folder, a file of any
    other kind, or a missing or read-only parent folder is refused (:func:`check_output`). The GIF gets
    the mode of a plain new file (0666 less the umask).

    Args:
        run_dir: run folder with ``samples/epoch_XXXX.png``.
        out: GIF path.
        fps: frames per second, > 0 and at most :data:`MAX_FPS` (frames of at least 10 ms).
        every: keep every K-th snapshot (the last one is always kept); >= 1.
        max_side: frames larger than this are downscaled (keeps the GIF small enough for a README);
            at least :data:`MIN_SIDE`.
        hold_last: extra seconds the last frame stays on screen (>= 0).

    Returns:
        The GIF path and the number of frames.
    """
    import imageio.v3 as iio  # local: imageio/NumPy/PIL stay out of `import covidxray.cli` (it imports this module)
    import numpy as np  # local: as above
    from PIL import Image, ImageFont  # local: as above

    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and 0 < fps <= MAX_FPS):
        raise CovidXrayError(f"--fps must be a finite number > 0 and <= {MAX_FPS:g}; got {fps}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise CovidXrayError(f"--every must be a whole number >= 1; got {every}")
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < MIN_SIDE:
        raise CovidXrayError(f"--max-side must be a whole number >= {MIN_SIDE}; got {max_side}")
    if not (isinstance(hold_last, (int, float)) and math.isfinite(hold_last) and hold_last >= 0):
        raise CovidXrayError(f"hold_last must be a finite number >= 0; got {hold_last}")
    snaps = list_snapshots(run_dir)
    out = check_output(out)
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
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
        size = size or img.size
        if img.size != size:  # a snapshot of another grid: fit it to the first frame's size
            img = img.resize(size, Image.LANCZOS)
        font = ImageFont.load_default(size=max(10, img.height // 32))
        frames.append(np.asarray(_label_frame(img, f"epoch {epoch}", font)))
    durations = [1000.0 / fps] * len(frames)
    durations[-1] += 1000.0 * hold_last
    try:
        with atomic_path(out) as tmp:
            # One frame: a plain number (Pillow's single-image GIF writer does not take a list of durations).
            duration = durations if len(frames) > 1 else durations[0]
            iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=duration, loop=0)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile: the old GIF (if any) is kept
        raise CovidXrayError(f"cannot write {out}: {exc.strerror or exc}",
                             "Check the folder and the free space") from None
    return out, len(frames)
