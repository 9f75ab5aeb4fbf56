"""Commands announced by the product but not built yet: they say what they will do and exit 2."""

from __future__ import annotations

from typing import List, Optional

import typer

from covidxray.cli._common import fail


def segment_cmd(args: Optional[List[str]] = typer.Argument(None, help="(not available yet)")) -> None:
    """[not available yet] Train/apply U-Net lung segmentation on prepared images with masks (Dice, IoU)."""
    raise fail("`covidxray segment` is not available yet: it will train and apply U-Net lung segmentation "
               "on prepared images with masks; follow the project's issues for it")
