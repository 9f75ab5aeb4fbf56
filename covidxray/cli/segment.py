"""``covidxray segment``: lung masks, overlays, crops and a measurements table for any X-rays."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from covidxray.cli._common import Number, console, user_errors

#: Unreadable files named in the summary (all of them are in segment.csv).
SHOW_UNREADABLE = 5


@user_errors
def segment_cmd(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Segmenter run folder (best.pt, else last.pt) or .pt file."),
    inputs: Path = typer.Argument(..., metavar="INPUT", help="An X-ray file, or a folder (searched recursively)."),
    out: Path = typer.Argument(..., metavar="OUT", help="Output folder: masks/, overlays/, crops/, segment.csv, "
                               "segment.json. New, empty, or an earlier segment output (resumed); not inside INPUT."),
    batch_size: int = typer.Option(16, "--batch-size", parser=Number(int, ge=1), help="Images per forward pass."),
    threshold: Optional[float] = typer.Option(None, "--threshold", parser=Number(float, gt=0, lt=1),
                                              help="Lung probability threshold in (0, 1) "
                                              "(default: the checkpoint's eval.threshold)."),
    overlay: bool = typer.Option(True, "--overlay/--no-overlay", help="Write overlays/ (the outline on the X-ray)."),
    crop: bool = typer.Option(False, "--crop", help="Also write crops/: the X-ray cut to the lungs' bounding box."),
    crop_margin: float = typer.Option(0.05, "--crop-margin", parser=Number(float, ge=0, lt=0.5),
                                      help="Margin of the crops, a fraction of the side, in [0, 0.5)."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average with the mirrored image (for models trained with "
                             "aug.hflip=true; it lowers the Dice of models trained without flips)."),
    postprocess: bool = typer.Option(True, "--postprocess/--no-postprocess",
                                     help="Keep the two largest components and fill their holes."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every image, also with other settings than "
                                   "the earlier run into OUT (default: skip the images already done)."),
) -> None:
    """Segment the lungs of X-rays at their own size and orientation (EXIF applied), with a table.

    segment.csv has one row per input: file, width, height, lung_area_px, lung_fraction, image_left_px,
    image_right_px (image sides, not the patient's), components, mean_intensity and status (ok,
    suspicious: ..., unreadable: ...). A rerun into the same OUT (also after a kill) skips the images
    already done.
    """
    from covidxray.infer.segment import segment_images, shown

    con = console()
    res = segment_images(checkpoint, inputs, out, batch_size=batch_size, threshold=threshold, overlay=overlay,
                         crop=crop, crop_margin=crop_margin, tta=tta, postprocess=postprocess, device=device,
                         overwrite=overwrite, console=con)
    bad = res["unreadable"]
    speed = f"{res['images_per_s']:.1f} images/s on {res['device']}, " if res["segmented"] else ""
    con.print(f"segmented {res['segmented']} images, {res['skipped']} skipped (already done), {len(bad)} unreadable, "
              f"{res['suspicious']} suspicious ({speed}threshold {res['threshold']:g}); "
              f"outputs in {shown(res['out'])}, table {shown(res['csv'])}", highlight=False, markup=False, soft_wrap=True)
    if bad:
        listed = "; ".join(f"{f} ({why})" for f, why in bad[:SHOW_UNREADABLE])
        more = f"; and {len(bad) - SHOW_UNREADABLE} more" if len(bad) > SHOW_UNREADABLE else ""
        con.print(f"unreadable ({len(bad)}): {listed}{more} (their rows in segment.csv say why)",
                  highlight=False, markup=False, soft_wrap=True)
