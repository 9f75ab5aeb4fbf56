"""``covidxray evaluate``: score a classifier, a generator (a run, a checkpoint or ``--fake`` PNGs), or
``--compare`` earlier outputs in one table."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, Optional

import typer

from covidxray.cli._common import GUIDANCE_OPTION, SAMPLER_OPTION, STEPS_OPTION, Number, console, user_errors
from covidxray.errors import CovidXrayError
from covidxray.utils import ProgressBar


#: The options that apply to each kind of evaluation (beside --data, --split, --out, --device, --batch-size);
#: any other option given is refused with the kind named, never ignored.
OPTIONS = {
    "classifier": {"mc_samples"},
    "segmentation": {"images", "masks", "threshold", "tta", "postprocess"},
    "generator": {"seed", "n", "repeats", "metrics", "class_", "inception_weights", "cxr_features", "fake",
                  "skip_unreadable", "save_samples", "downstream", "classifier", "seeds", "synthetic_ratio", "epochs",
                  "set_", "segmenter", "steps", "guidance", "sampler", "synthetic_pool"},
}
_ALL = set().union(*OPTIONS.values())


def _check_options(ctx: typer.Context, kind: str, what, family: str) -> None:
    """Refuse the options given on the command line that do not apply to this kind of model."""
    wrong = []
    for param in ctx.command.params:
        if param.name in _ALL - OPTIONS[kind] and _given(ctx, param.name):
            wrong.append(max(param.opts, key=len))
    if wrong:
        raise CovidXrayError(f"{', '.join(wrong)} do(es) not apply to the {family} model in {what}",
                             "See `covidxray evaluate --help` for the options of each kind of model")


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


@user_errors
def evaluate_cmd(
    ctx: typer.Context,
    targets: Optional[List[Path]] = typer.Argument(None, metavar="RUN_OR_CHECKPOINT",
                                                   help="Run folder (best.pt, else last.pt) or .pt file; with "
                                                        "--compare: the evaluate output folders."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared folder with the real images (`covidxray prepare`)."),
    split: str = typer.Option("test", "--split", help="Split to score on / reference split: test, val or train."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/eval-...); with "
                                       "--compare: the markdown file (default: print only)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass "
                                             "(default: 256 for classifiers, 64 for Inception features).",
                                             parser=Number(int, ge=1)),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated draws (draw r uses seed + r) and subsets."),
    mc_samples: Optional[int] = typer.Option(None, "--mc-samples", help="Classifiers: Monte-Carlo dropout passes "
                                             "per image (default: the run's eval.mc_samples).", parser=Number(int, ge=1)),
    n: Optional[int] = typer.Option(None, "-n", "--num", help="Generators: images per draw (default: as many as "
                                    "the real training images, the floor's N).", parser=Number(int, ge=1)),
    repeats: int = typer.Option(5, "--repeats", help="Generators: draws of N images (mean ± std).",
                                 parser=Number(int, ge=1)),
    metrics: str = typer.Option("fid,kid,pr,dc,memorization,diversity", "--metrics",
                                help="Generators: comma-separated subset of fid,kid,pr,dc,memorization,diversity."),
    class_: Optional[str] = typer.Option(None, "--class", help="Conditional generators: one class, or all."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="The FID Inception TorchScript "
                                                     "(default: $COVIDXRAY_INCEPTION_WEIGHTS, else covidxray[fid])."),
    cxr_features: Optional[Path] = typer.Option(None, "--cxr-features", help="A classifier run trained on real "
                                                "X-rays: also report fd_cxr/kd_cxr in its feature space."),
    fake: Optional[Path] = typer.Option(None, "--fake", help="Score a folder of generated PNGs (per-class "
                                        "sub-folders allowed) instead of a checkpoint."),
    skip_unreadable: bool = typer.Option(False, "--skip-unreadable", help="--fake: evaluate the readable images "
                                         "and list the unreadable ones (default: refuse)."),
    save_samples: bool = typer.Option(False, "--save-samples", help="Generators: also write the first draw's images "
                                      "as PNGs into OUT/samples/ (per class for conditional models)."),
    downstream: bool = typer.Option(False, "--downstream", help="Also train classifiers on real / real + synthetic "
                                    "/ synthetic images and test them on real ones."),
    classifier: str = typer.Option("resnet18", "--classifier", help="--downstream: the classifier model."),
    seeds: int = typer.Option(3, "--seeds", help="--downstream: seeds per arm.", parser=Number(int, ge=1)),
    synthetic_ratio: float = typer.Option(0.5, "--synthetic-ratio", help="--downstream: fraction of each batch "
                                          "that is generated in arm (b).", parser=Number(float, gt=0, lt=1)),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="--downstream: classifier epochs (default: its config).",
                                           parser=Number(int, ge=1)),
    synthetic_pool: int = typer.Option(0, "--synthetic-pool", help="--downstream: synthetic images drawn once per "
                                       "evaluation for arms (b) and (c); 0 = on the fly for a latent generator (GANs, "
                                       "cVAE), else as many as the real training split.",
                                       parser=Number(int, ge=0, le=1_000_000)),
    steps: Optional[int] = STEPS_OPTION,
    guidance: Optional[float] = GUIDANCE_OPTION,
    sampler: Optional[str] = SAMPLER_OPTION,
    set_: Optional[List[str]] = typer.Option(None, "--set", help="--downstream: classifier override key=value, repeatable."),
    compare: bool = typer.Option(False, "--compare", help="Build one markdown table from the given evaluate output "
                                 "folders (-o FILE to write it)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Segmenters: a folder of X-rays to score against "
                                          "--masks (instead of --data)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Segmenters: the ground-truth masks of --images, "
                                         "paired by file name."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Segmenters: lung probability threshold "
                                              "(default: the run's eval.threshold).", parser=Number(float, gt=0, lt=1)),
    tta: bool = typer.Option(False, "--tta", help="Segmenters: test-time augmentation (mean with the mirror image)."),
    postprocess: bool = typer.Option(True, "--postprocess/--no-postprocess", help="Segmenters: keep the two largest "
                                     "components and fill holes, as `segment` does."),
    segmenter: Optional[Path] = typer.Option(None, "--segmenter", help="pix2pix runs: a U-Net run; reports the Dice "
                                             "between the given masks and its masks of the drawn X-rays."),
) -> None:
    """Score a model on real X-rays.

    Classifiers: accuracy, balanced accuracy, per-class precision/recall/F1, ROC-AUC, confusion matrix.
    Segmenters (U-Net runs): Dice, IoU, HD95, ASD per image and mean ± std, the worst cases, against the masks
    of --data or of --images/--masks folders.
    Generators (GAN, VAE and pix2pix runs, checkpoints, --fake folders): FID, KID, precision/recall, density/coverage, each
    beside the real-vs-real floor at the same N; diversity; a memorisation check; with --downstream, the gain
    of a classifier trained with synthetic images. Writes OUT/metrics.json and a report.
    """
    targets = list(targets or [])
    if fake is not None:
        _check_options(ctx, "generator", fake, "--fake images")
    con = console()
    log = lambda msg: con.print(msg, highlight=False, soft_wrap=True, markup=False)  # noqa: E731
    if compare:
        from covidxray.evaluate.report import write_compare

        if not targets:
            raise CovidXrayError("--compare needs the output folders of earlier `covidxray evaluate` runs",
                                 "e.g. covidxray evaluate --compare runs/a/eval-gen-test-last runs/b/eval-gen-test-last -o results.md")
        text = write_compare(targets, out)
        con.print(text, highlight=False, markup=False, soft_wrap=True)
        if out is not None:
            log(f"wrote {out}")
        return
    if data is None and images is None:
        raise CovidXrayError("--data is required", "Pass the prepared folder with the real images, e.g. --data data/cxr128")
    if len(targets) > 1:
        raise CovidXrayError(f"one RUN_OR_CHECKPOINT at a time, got {len(targets)}",
                             "To tabulate several evaluations use --compare DIR_A DIR_B ...")
    if batch_size is not None and batch_size < 1:
        raise CovidXrayError(f"--batch-size must be at least 1, got {batch_size}")
    target = targets[0] if targets else None
    if fake is None and target is None:
        raise CovidXrayError("nothing to evaluate", "Pass a run folder or checkpoint, or --fake FOLDER")
    loaded = None
    if fake is None:  # loaded once: what the model can do picks the evaluation, which then uses it as loaded
        from covidxray.infer.protocol import Classifier, Segmenter, load

        loaded = load(target)
        kind = ("segmentation" if isinstance(loaded, Segmenter) else
                "classifier" if isinstance(loaded, Classifier) else "generator")
        _check_options(ctx, kind, loaded.path, loaded.family)
        if kind == "segmentation":
            return _segmenter(con, log, target, data, split, images, masks, out, device, batch_size or 32, threshold,
                              tta, postprocess, loaded)
        if images is not None or masks is not None:
            raise CovidXrayError(f"--images/--masks score segmenters; this checkpoint holds a {loaded.family} model",
                                 "Pass a U-Net run, or drop --images/--masks")
        if data is None:
            raise CovidXrayError("--data is required", "Pass the prepared folder with the real images")
        if kind == "classifier":
            return _classifier(con, target, data, split, out, device, batch_size or 256, mc_samples, loaded)
    from covidxray.evaluate.generator import GeneratorEvaluation, parse_metrics

    _generator(con, log, GeneratorEvaluation(
        data=data, run=target, loaded=loaded, fake=fake, split=split, n=n, repeats=repeats,
        metrics=parse_metrics(metrics), class_name=class_,
        inception_weights=str(inception_weights) if inception_weights else None,
        cxr_features=str(cxr_features) if cxr_features else None, out=out, device=device, batch_size=batch_size or 64,
        seed=seed, skip_unreadable=skip_unreadable, save_samples=save_samples,
        segmenter=str(segmenter) if segmenter else None,
        sampling=dict(steps=steps, guidance=guidance, sampler=sampler),
        downstream=dict(classifier=classifier, seeds=seeds, synthetic_ratio=synthetic_ratio, epochs=epochs,
                        pool=synthetic_pool, sets=list(set_ or []), console=con) if downstream else None))


def _generator(con, log, req) -> None:
    """Run a generator evaluation (its request filled from the options) and print its table."""
    from rich.table import Table

    from covidxray.evaluate.generator import run_generator_evaluation
    from covidxray.evaluate.report import fmt, metric_rows

    @contextlib.contextmanager
    def progress(what: str, total: int):
        with ProgressBar(con, f"{what} of the generated images", total, transient=True) as bar:
            yield bar.advance

    res = run_generator_evaluation(req, log, progress)
    feats = res["features"]
    title = (f"{res['model']} vs the {res['split']} split of {res['data']} (N = {res['reference_n']}): "
             f"N = {res['n']} generated x {res['repeats']} draws, floor = {res['floor_n']} real training images")
    table = Table()
    for col in ("metric", "generated", "real-vs-real floor"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for a, b, c in metric_rows(res):
        table.add_row(a, b, c)
    memo = res.get("memorization")
    if memo:
        table.add_section()
        table.add_row("copies (Inception / pixels)", f"{memo['copies'] * 100:.1f} % / {memo['copies_pixel'] * 100:.1f} %",
                      f"≈ {memo['quantile'] * 100:g} % by construction")
        ct = memo["ct"]
        table.add_row("data-copying C_T", "-" if ct.get("ct") is None else f"{ct['ct']:.2f}", "≈ 0")
    div = res.get("diversity")
    if div:
        table.add_row("MS-SSIM of pairs", f"{div['generated']['mean']:.3f}", f"{div['real_train']['mean']:.3f}")
    down = res.get("downstream")
    if down and down.get("delta"):
        d = down["delta"]
        ci = d.get("ci95")
        table.add_section()
        table.add_row("downstream Δ balanced acc.", f"{d['mean']:+.3f} ± {d['std']:.3f}"
                      + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""), f"{len(down['seeds'])} seed(s)")
        table.add_row("  real only / + synthetic / TSTR",
                      " / ".join(fmt(down["arms"][a]["balanced_accuracy"], 3) for a in
                                 ("real", "real+synthetic", "synthetic")), "")
    con.print(title, highlight=False, markup=False, soft_wrap=True)
    con.print(table)
    for name, rec in feats.items():
        log(f"features {name}: {rec['description']}; filter: {rec['filter']}")
    if down and down.get("refused"):
        log(f"downstream: {down['refused']}")
    log(f"wrote {res['out']}/report.md and metrics.json ({len(res.get('figures', []))} figures)")


def _classifier(con, checkpoint, data, split, out, device, batch_size, mc_samples, loaded) -> None:
    from rich.table import Table

    from covidxray.evaluate.classifier import evaluate_classifier

    if mc_samples is not None and mc_samples < 1:
        raise CovidXrayError(f"--mc-samples must be at least 1, got {mc_samples}")
    res = evaluate_classifier(checkpoint, data, split, out, device, batch_size, mc_samples,
                              log=lambda msg: con.print(msg, highlight=False, soft_wrap=True), loaded=loaded)
    m = res["metrics"]
    title = (f"{res['model']} ({Path(res['checkpoint']).name}, epoch {res['checkpoint_epoch']}) on {res['split']} of "
             f"{res['data']}: N = {m['n']}, {res['image_size']} px"
             + (f", {res['mc_samples']} MC-dropout passes" if res["mc_samples"] > 1 else ""))
    table = Table()
    for col in ("class", "N", "precision", "recall", "F1", "AUC"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c in res["classes"]:
        pc = res["per_class"][c]
        table.add_row(c, str(pc["support"]), f"{pc['precision']:.3f}", f"{pc['recall']:.3f}", f"{pc['f1']:.3f}",
                      "-" if pc["auc"] is None else f"{pc['auc']:.3f}")
    table.add_section()
    table.add_row("macro", str(m["n"]), "", f"{m['balanced_accuracy']:.3f}", f"{m['macro_f1']:.3f}",
                  "-" if m["auc"] is None else f"{m['auc']:.3f}")
    con.print(title, highlight=False, markup=False, soft_wrap=True)
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


def _segmenter(con, log, target, data, split, images, masks, out, device, batch_size, threshold, tta, postprocess,
               loaded) -> None:
    from rich.table import Table

    from covidxray.evaluate.segmentation import LABELS, METRICS, evaluate_segmenter

    res = evaluate_segmenter(target, data, split, images, masks, out, device, batch_size, threshold, tta, postprocess,
                             log=log, loaded=loaded)
    where = f"{res['split']} of {res['data']}" if "data" in res else f"{res['images']} vs {res['masks']}"
    title = (f"{res['model']} (epoch {res['checkpoint_epoch']}) on {where}: N = {res['n']}, threshold "
             f"{res['threshold']:g}, post-processing {res['postprocess']}, TTA {res['tta']}")
    table = Table()
    for col in ("metric", "mean ± std", "median", "min", "max"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for m in METRICS:
        v = res["summary"][m]
        table.add_row(LABELS[m], f"{v['mean']:.4f} ± {v['std']:.4f}", f"{v['median']:.4f}",
                      f"{v['min']:.4f}", f"{v['max']:.4f}")
    con.print(title, highlight=False, markup=False, soft_wrap=True)
    con.print(table)
    log(f"HD95/ASD in {res['distance_unit']} ({res['resolution']}); empty ground truths {res['n_empty_target']}, "
        f"empty predictions {res['n_empty_pred']}, one of the two empty {res['n_one_empty']} (scored, never dropped)")
    log(f"wrote {res['out']}/report.md, metrics.json, per_image.csv, worst.png")
