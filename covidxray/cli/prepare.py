"""``covidxray prepare``: turn a chest X-ray source folder (or demo phantoms) into the prepared layout.

Usage::

    covidxray prepare SRC OUT [--size 224] [--fit stretch|pad|crop] [--val 0.1] [--test 0.1]
                              [--seed 0] [--workers N] [--classes covid,normal] [--masks/--no-masks]
    covidxray prepare --demo OUT [--per-class 120] [--size 128] [--seed 0]
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from covidxray.cli._common import Number, console, user_errors
from covidxray.errors import CovidXrayError

DEFAULT_SIZE = 224
DEFAULT_DEMO_SIZE = 128
DEFAULT_PER_CLASS = 120
#: The --size range (covidxray.data.prepare.MIN_SIZE/MAX_SIZE, not imported: the CLI starts without it).
MIN_SIZE, MAX_SIZE = 8, 8192


class Fit(str, Enum):
    stretch = "stretch"
    pad = "pad"
    crop = "crop"


@user_errors
def prepare_cmd(
    src: Annotated[Optional[Path], typer.Argument(
        help="Source folder: Kaggle COVID-19 Radiography Database v2/v3/v4 or one sub-folder per class. "
             "With --demo, the only positional is OUT.", metavar="SRC", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Argument(
        help="Output folder (created; rerun the same command to resume an interrupted run).",
        metavar="OUT", show_default=False)] = None,
    size: Annotated[Optional[int], typer.Option(
        "--size", help=f"Square output side in pixels, {MIN_SIZE}..{MAX_SIZE} (default: {DEFAULT_SIZE}; "
                       f"{DEFAULT_DEMO_SIZE} with --demo).",
        show_default=False, parser=Number(int, ge=MIN_SIZE, le=MAX_SIZE))] = None,
    fit: Annotated[Optional[Fit], typer.Option(
        "--fit", help="stretch (ignore aspect), pad (letterbox with black) or crop (centre square) "
                      "(default: stretch).", show_default=False, case_sensitive=False)] = None,
    val: Annotated[float, typer.Option(
        "--val", help="Validation fraction per class, 0 <= val < 1 (val + test < 1).",
        parser=Number(float, ge=0, lt=1))] = 0.1,
    test: Annotated[float, typer.Option(
        "--test", help="Test fraction per class, 0 <= test < 1 (val + test < 1).",
        parser=Number(float, ge=0, lt=1))] = 0.1,
    seed: Annotated[int, typer.Option(
        "--seed", help="Seed of the split (and of the demo phantoms), >= 0.", parser=Number(int, ge=0))] = 0,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", help="Decoding processes, >= 1 (default: all cores); 1 runs in this process.",
        show_default=False, parser=Number(int, ge=1))] = None,
    classes: Annotated[Optional[str], typer.Option(
        "--classes", help="Comma-separated subset of classes, e.g. covid,normal (default: all found).",
        show_default=False)] = None,
    masks: Annotated[bool, typer.Option(
        "--masks/--no-masks", help="Prepare lung masks where the source has them.")] = True,
    demo: Annotated[bool, typer.Option(
        "--demo", help="Write synthetic phantoms (not medical data) instead of reading SRC.")] = False,
    per_class: Annotated[Optional[int], typer.Option(
        "--per-class", help=f"Phantoms per class with --demo, >= 1 (default: {DEFAULT_PER_CLASS}).",
        show_default=False, parser=Number(int, ge=1))] = None,
) -> None:
    """Prepare chest X-rays: detect the layout, convert to 8-bit gray, resize, split train/val/test.

    Writes OUT/{train,val,test}/<class>/*.png (+ masks/), manifest.csv, rejected.csv, then prepare.json.

    Rerun the same command to resume an interrupted run. The layout contract: docs/data.md.
    """
    from covidxray.data.layouts import shown
    from covidxray.data.prepare import prepare, prepare_demo

    con = console()
    fit_value = fit.value if fit is not None else None
    if demo:
        if out is not None:
            raise CovidXrayError(
                "--demo takes one positional argument, OUT (it reads no source)",
                "Use: covidxray prepare --demo OUT",
            )
        if src is None:
            raise CovidXrayError("missing OUT", "Use: covidxray prepare --demo OUT")
        unused = [name for name, given in (("--fit", fit is not None), ("--classes", classes is not None),
                                           ("--no-masks", not masks)) if given]
        if unused:
            raise CovidXrayError(f"{', '.join(unused)} do(es) not apply to --demo", "Leave it out")
        info = prepare_demo(
            src,
            per_class=DEFAULT_PER_CLASS if per_class is None else per_class,
            size=DEFAULT_DEMO_SIZE if size is None else size,
            seed=seed, val=val, test=test, workers=1 if workers is None else workers,
            progress=True, console=con,
        )
        target = src
    else:
        if src is None or out is None:
            raise CovidXrayError(
                "missing " + ("SRC and OUT" if src is None else "OUT"),
                "Use: covidxray prepare SRC OUT (or covidxray prepare --demo OUT)",
            )
        if per_class is not None:
            raise CovidXrayError("--per-class only applies with --demo", "Leave it out or add --demo")
        info = prepare(
            src, out,
            size=DEFAULT_SIZE if size is None else size,
            fit=fit_value or "stretch",
            val=val, test=test, seed=seed, workers=workers, classes=classes, masks=masks,
            progress=True, console=con,
        )
        target = out
    table, details = summary_tables(info)
    con.print(table)
    con.print(details)
    con.print(f"prepared: {shown(target)}", highlight=False, soft_wrap=True, markup=False)


def summary_tables(info: dict[str, Any]):
    """Rich tables for the summary: images per split x class (plus masks), then the other counts.

    Returns:
        (counts table, details table).
    """
    from rich.table import Table

    splits = ("train", "val", "test")
    table = Table(title=f"prepared images ({info['size']} px, fit {info['fit']})", title_justify="left")
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    table.add_column("masks", justify="right")
    totals = {s: 0 for s in splits}
    for cls in info["classes"]:
        row = [info["counts"][s].get(cls, 0) for s in splits]
        for s, n in zip(splits, row):
            totals[s] += n
        n_masks = sum(info["masks_counts"][s].get(cls, 0) for s in splits)
        table.add_row(cls, *map(str, row), str(sum(row)), str(n_masks))
    all_masks = sum(sum(c.values()) for c in info["masks_counts"].values())
    table.add_section()
    table.add_row("all", *(str(totals[s]) for s in splits), str(sum(totals.values())), str(all_masks))

    details = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    details.add_column(style="bold")
    details.add_column()
    details.add_row("layout", f"{info['layout']} ({info.get('layout_description', '')})")
    details.add_row("images found", str(info.get("images_found", "?")))
    details.add_row("rejected files", f"{info['rejected']} (listed in rejected.csv)")
    if info.get("unreadable_folders"):
        details.add_row("unreadable folders (rejected)", f"{info['unreadable_folders']} (their files were not "
                                                        "prepared; listed in rejected.csv)")
    details.add_row("images without mask", str(info.get("images_without_mask", "?")))
    details.add_row("ignored non-image files", str(info.get("ignored_files", 0)))
    details.add_row("duplicate groups (kept in one split)", str(info["duplicates"]))
    details.add_row("images under two classes (rejected)", str(info["cross_class_duplicates"]))
    if info.get("patients"):
        details.add_row("patients (split by patient)", str(info["patients"]))
    return table, details
