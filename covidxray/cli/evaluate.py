"""``covidxray evaluate``: score a trained model on a split of a prepared folder (classifiers for now)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from covidxray.cli._common import console, user_errors
from covidxray.errors import CovidXrayError


@user_errors
def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="Run folder (uses checkpoints/best.pt, else last.pt) or a .pt file.",
                                      metavar="RUN_OR_CHECKPOINT"),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared folder to evaluate on (output of `covidxray prepare`)."),
    split: str = typer.Option("test", "--split", help="Split to score: test, val or train."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN/eval-SPLIT-CHECKPOINT)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward pass."),
    mc_samples: Optional[int] = typer.Option(None, "--mc-samples", help="Monte-Carlo dropout passes per image "
                                             "(default: the run's eval.mc_samples; models with model.mc_dropout)."),
) -> None:
    """Score a classifier: accuracy, balanced accuracy, per-class precision/recall/F1, macro-F1, ROC-AUC, confusion.

    Writes OUT/metrics.json, OUT/predictions.csv and OUT/confusion.png. Generator metrics (FID, KID, ...) are
    not available yet.
    """
    from rich.table import Table

    from covidxray.evaluate.classifier import evaluate_classifier

    if data is None:
        raise CovidXrayError("--data is required", "Pass the prepared folder to evaluate on, e.g. --data data/cxr128")
    if batch_size < 1:
        raise CovidXrayError(f"--batch-size must be at least 1, got {batch_size}")
    if mc_samples is not None and mc_samples < 1:
        raise CovidXrayError(f"--mc-samples must be at least 1, got {mc_samples}")
    con = console()
    res = evaluate_classifier(checkpoint, data, split, out, device, batch_size, mc_samples,
                              log=lambda msg: con.print(msg, highlight=False, soft_wrap=True))
    m = res["metrics"]
    title = (f"{res['model']} ({Path(res['checkpoint']).name}, epoch {res['checkpoint_epoch']}) on {res['split']} of "
             f"{res['data']}: N = {m['n']}, {res['image_size']} px"
             + (f", {res['mc_samples']} MC-dropout passes" if res["mc_samples"] > 1 else ""))
    table = Table(title=title, title_justify="left")
    for col in ("class", "N", "precision", "recall", "F1", "AUC"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c in res["classes"]:
        pc = res["per_class"][c]
        table.add_row(c, str(pc["support"]), f"{pc['precision']:.3f}", f"{pc['recall']:.3f}", f"{pc['f1']:.3f}",
                      "-" if pc["auc"] is None else f"{pc['auc']:.3f}")
    table.add_section()
    table.add_row("macro", str(m["n"]), "", f"{m['balanced_accuracy']:.3f}", f"{m['macro_f1']:.3f}",
                  "-" if m["auc"] is None else f"{m['auc']:.3f}")
    con.print(table)
    con.print(f"accuracy {m['accuracy']:.3f}  balanced accuracy {m['balanced_accuracy']:.3f}  macro-F1 "
              f"{m['macro_f1']:.3f}  ROC-AUC (one-vs-rest, macro) {'-' if m['auc'] is None else format(m['auc'], '.3f')}"
              f"  NLL {m['nll']:.3f}", highlight=False)
    if res["auc_error"]:
        con.print(f"ROC-AUC not reported: {res['auc_error']}", highlight=False)
    ov = res["overlap_with_training"]
    con.print("overlap with the training split: " + (
        f"{ov['same_pixels']} same-pixel images, {ov['same_patient']} same-patient images" if ov["checked"]
        else f"not checked ({ov['reason']})"), highlight=False)
    con.print(f"wrote {res['out']}/metrics.json, predictions.csv, confusion.png", highlight=False, soft_wrap=True)
