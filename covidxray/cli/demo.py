"""``covidxray demo``: prepare --demo -> a short rawgan training -> sample -> gif -> a small classifier ->
evaluate it -> evaluate the GAN (FID beside the real-vs-real floor) -> a short U-Net -> segment a few X-rays
with overlays (and its test Dice), on built-in phantoms."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from covidxray.cli._common import Number, console, user_errors

# Small enough to finish in well under two minutes on a 2-core CPU, large enough
# to show a GAN learning the outline of a chest.
DEMO_SIZE = 64
DEMO_PER_CLASS = 120
DEMO_EPOCHS = 30
DEMO_SETS = ["arch.g_channels=32", "arch.d_channels=32", "train.batch_size=32", "train.checkpoint_every=5"]
DEMO_CLASSIFIER = "smallcnn"
DEMO_CLASSIFIER_EPOCHS = 10
# Generator evaluation: N samples per draw and draws; the FID Inception runs at ~10 images/s on 2 CPU cores.
DEMO_EVAL_N = 96
DEMO_EVAL_REPEATS = 2
# Lung segmentation: a small U-Net (16 -> 256 channels) for a few epochs, then `segment` on a few test phantoms.
DEMO_UNET_EPOCHS = 8
DEMO_UNET_SETS = ["arch.width=16", "train.batch_size=16"]
DEMO_SEGMENT_N = 6


#: What the demo writes into OUT (also the names of a demo folder written before the output-folder marker).
DEMO_OUTPUTS = ("data", "runs", "samples", "progress.gif", "evaluate", "evaluate-gan", "evaluate-unet", "segment",
                "segment-input")


@user_errors
def demo_cmd(
    out: Path = typer.Argument(Path("covidxray-demo"), help="Folder for everything the demo writes."),
    epochs: int = typer.Option(DEMO_EPOCHS, "--epochs", help="Training epochs.", parser=Number(int, ge=1)),
    seed: int = typer.Option(0, "--seed", help="Seed for the phantoms and the training."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
) -> None:
    """Run the whole pipeline on synthetic phantoms (NOT medical data) and print where the outputs are."""
    from rich.table import Table

    from covidxray.config import resolve_config
    from covidxray.data.grids import save_grid
    from covidxray.evaluate.classifier import evaluate_classifier
    from covidxray.data.prepare import prepare_demo
    from covidxray.infer.generate import load_generator, write_samples
    from covidxray.infer.gif import make_gif
    from covidxray.train.loop import start_run
    from covidxray.utils import resolve_device

    from covidxray.outdir import check_output_dir, claim

    # OUT is new or an earlier demo's (it replaces segment-input/ and its own files there, nothing else)
    check_output_dir(out, "demo", legacy=DEMO_OUTPUTS, option="OUT")
    claim(out, "demo", "demo")
    con = console()
    t0 = time.perf_counter()
    data = out / "data"
    con.rule("1/9 prepare --demo (synthetic phantoms, not medical data)")
    prepare_demo(data, per_class=DEMO_PER_CLASS, size=DEMO_SIZE, seed=seed)
    con.rule("2/9 train rawgan")
    cfg = resolve_config("rawgan", flags={"data": {"path": str(data.resolve()), "image_size": DEMO_SIZE},
                                          "train": {"epochs": epochs, "seed": seed, "device": device}},
                         sets=DEMO_SETS)
    cfg.out = str(out / "runs")
    trainer, finished = start_run(cfg, console=con)
    if not finished:
        raise typer.Exit(130)
    run_dir = trainer.run_dir
    con.rule("3/9 sample")
    gen = load_generator(run_dir)
    images = gen.sample(64, seed=seed, device=resolve_device(device))
    samples = out / "samples"
    for old in samples.glob("sample_*.png"):
        old.unlink()
    write_samples(images, samples)
    grid = save_grid(images, samples / "grid.png")
    con.rule("4/9 gif")
    gif, frames = make_gif(run_dir, out / "progress.gif", fps=5)
    con.rule(f"5/9 train {DEMO_CLASSIFIER} (a classifier)")
    clf_cfg = resolve_config(DEMO_CLASSIFIER, flags={"data": {"path": str(data.resolve())},
                                                     "train": {"epochs": max(1, min(epochs, DEMO_CLASSIFIER_EPOCHS)),
                                                               "seed": seed, "device": device}})
    clf_cfg.out = str(out / "runs")
    clf, finished = start_run(clf_cfg, console=con)
    if not finished:
        raise typer.Exit(130)
    con.rule("6/9 evaluate the classifier on the test split")
    res = evaluate_classifier(clf.run_dir, data, "test", out / "evaluate", device=device,
                              log=lambda msg: con.print(msg, highlight=False))
    m = res["metrics"]
    con.rule("7/9 evaluate the GAN: FID beside the real-vs-real floor, KID, precision/recall, copies")
    from covidxray.evaluate.generator import evaluate_generator

    gres = evaluate_generator(run_dir, data, n=DEMO_EVAL_N, repeats=DEMO_EVAL_REPEATS, out=out / "evaluate-gan",
                              device=device, seed=seed, log=lambda msg: con.print(msg, highlight=False, markup=False))
    gm = gres["metrics"]
    fd = "fid" if "fid" in gm else "fd_unverified"
    con.rule("8/9 train unet (lung segmentation)")
    seg_cfg = resolve_config("unet", flags={"data": {"path": str(data.resolve())},
                                            "train": {"epochs": DEMO_UNET_EPOCHS, "seed": seed, "device": device}},
                             sets=DEMO_UNET_SETS)
    seg_cfg.out = str(out / "runs")
    seg, finished = start_run(seg_cfg, console=con)
    if not finished:
        raise typer.Exit(130)
    con.rule(f"9/9 segment {DEMO_SEGMENT_N} test X-rays (masks, overlays, segment.csv) and score the test split")
    import shutil

    from covidxray.data.datasets import read_records
    from covidxray.evaluate.segmentation import evaluate_segmenter
    from covidxray.infer.segment import segment_images

    xrays = out / "segment-input"
    shutil.rmtree(xrays, ignore_errors=True)
    xrays.mkdir(parents=True)
    test_records = read_records(data, "test")[0]  # sorted by class: every k-th gives each class its turn
    for rec in test_records[::max(1, len(test_records) // DEMO_SEGMENT_N)][:DEMO_SEGMENT_N]:
        shutil.copy2(data / rec.file, xrays / Path(rec.file).name)
    sres = segment_images(seg.run_dir, xrays, out / "segment", device=device, overwrite=True, console=con)
    eres = evaluate_segmenter(seg.run_dir, data, "test", out=out / "evaluate-unet", device=device,
                              log=lambda msg: con.print(msg, highlight=False, markup=False))

    table = Table(title=f"covidxray demo finished in {time.perf_counter() - t0:.0f} s")
    table.add_column("what")
    table.add_column("where", overflow="fold")
    table.add_row("prepared phantoms", str(data))
    table.add_row("run folder", str(run_dir))
    table.add_row("64 samples + grid", str(grid))
    table.add_row(f"training GIF ({frames} frames)", str(gif))
    table.add_row("classifier run folder", str(clf.run_dir))
    table.add_row(f"test scores (N = {m['n']}): balanced accuracy {m['balanced_accuracy']:.2f}, macro-F1 "
                  f"{m['macro_f1']:.2f}", f"{res['out']}/metrics.json, confusion.png")
    table.add_row(f"GAN report: {fd.upper() if fd == 'fid' else fd} {gm[fd]['mean']:.1f} (real-vs-real floor "
                  f"{gm[fd + '_floor']['mean']:.1f}; N = {gres['n']}, reference {gres['reference_n']}), copies "
                  f"{gres['memorization']['copies'] * 100:.0f} %", f"{gres['out']}/report.md")
    table.add_row("U-Net run folder", str(seg.run_dir))
    table.add_row(f"{sres['segmented']} segmented X-rays: masks/, overlays/, segment.csv", str(out / "segment"))
    table.add_row(f"U-Net test Dice {eres['summary']['dice']['mean']:.3f} ± {eres['summary']['dice']['std']:.3f} "
                  f"(N = {eres['n']})", f"{eres['out']}/report.md, worst.png")
    con.print(table)
