"""The seed's GAN schedule (1.7 M images at 128 px): projected from epoch rates, and really trained.

Usage (from the repository root; the package need not be installed)::

    # projection: every GAN's 128 px epoch rate measured here (as in gan_throughput.py)
    PYTHONPATH=. python bench/gan_schedule.py --device cuda --data128 DIR [--models cgan acgan]
    # projection from the rates of an earlier `gan_throughput.py --json` (nothing measured)
    python bench/gan_schedule.py --rates-from bench.json
    # the schedule really trained, run folder kept
    PYTHONPATH=. python bench/gan_schedule.py --device cuda --skip-models --run-schedule cgan \\
        --schedule-out runs/bench-schedule

Sections (each prints its elapsed time; the summary table comes last):

* **models** (unless ``--skip-models`` or ``--rates-from``) - each GAN's epoch rate at 128 px,
  measured as in ``bench/gan_throughput.py`` (``bench/_bench.py``: default config,
  ``--warmup``/``--steps`` step rate, then ``fit()`` for ``--epochs`` more epochs, timed from the end
  of the first step to the end of the last).
* **schedule** - projected wall time of ``--schedule-images`` images at each model's 128 px epoch
  rate (no start-up, no per-epoch snapshots or checkpoints); ``--run-schedule MODEL`` really trains
  that many images (``fit()`` for ``ceil(images / train images)`` epochs, default config, snapshots
  every ~epochs/10, the model's default ``train.checkpoint_every``) and reports the measured wall
  time, or *stopped after N of M images* when it did not finish (Ctrl-C, SIGTERM from ``timeout``).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/, also when loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as gb  # noqa: E402  (it puts the repository root on sys.path)
import torch  # noqa: E402

SIZE = 128                         # the seed trained at 128 px


# --------------------------------------------------------------------------------------------
# Schedule run
# --------------------------------------------------------------------------------------------


def run_schedule(model: str, data: gb.DataInfo, batch: int, images: int, device: torch.device, args, tmp: Path,
                 log: Callable[[str], None]) -> dict[str, Any]:
    from covidxray.train.loop import new_run_dir

    res: dict[str, Any] = {"model": model, "size": SIZE, "batch": batch, "images": images, "data": data.kind}
    keep = bool(args.schedule_out)
    run_dir = new_run_dir(args.schedule_out, model) if keep else Path(tempfile.mkdtemp(prefix="schedule-", dir=tmp))
    trainer = None
    try:
        if data.error:
            raise RuntimeError(f"no data: {data.error}")
        epochs = math.ceil(images / data.n_train)
        t0 = time.perf_counter()
        # Default config; snapshots every ~epochs/10 (checkpoint_every stays the model's default).
        trainer = gb.build_trainer(model, SIZE, data, batch, device, run_dir, args,
                                   {"epochs": epochs, "snapshot_every": max(1, round(epochs / 10)),
                                    "checkpoint_every": _default_checkpoint_every(model)})
        res.update(epochs=epochs, n_train=len(trainer.data), batch=trainer.batch_size,
                   images_trained=epochs * trainer.batches_per_epoch * trainer.batch_size,
                   snapshot_every=trainer.cfg.train.snapshot_every,
                   checkpoint_every=trainer.cfg.train.checkpoint_every)
        log(f"schedule run: {model} at {SIZE} px, {epochs} epochs x {trainer.batches_per_epoch} steps of "
            f"{trainer.batch_size} ({res['images_trained']} images) in {run_dir}")
        t_built = time.perf_counter()
        fit = gb.timed_fit(trainer, epochs, trainer.device)
        res.update(build_s=t_built - t0, fit_s=fit["fit_total_s"], wall_s=time.perf_counter() - t0,
                   train_images_per_s=fit["images_per_s"], epoch_end_s=fit["epoch_end_s"],
                   epoch_end_per_epoch_s=fit["epoch_end_s"] / max(1, epochs - 1),
                   run_dir=str(run_dir) if keep else None, finished=fit["finished"],
                   images_done=fit["images_seen"])
        if not fit["finished"]:
            # Stopped before the end (e.g. by a time limit): the wall time is not the schedule's.
            res["error"] = (f"stopped after {fit['images_seen']:,} of {res['images_trained']:,} images "
                            f"({res['wall_s']:.0f} s)")
    except Exception as exc:
        res["error"] = gb.short(exc, 300)
        traceback.print_exc(file=sys.stderr)
    finally:
        del trainer
        gb.free(device)
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return res


def _default_checkpoint_every(model: str) -> int:
    from covidxray.config import resolve_config

    return resolve_config(model).train.checkpoint_every


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _schedule_table(console, sched) -> None:
    from rich.table import Table

    t = Table(title=f"schedule: {sched['images']:,} images at {SIZE} px (target < 5 min)", title_justify="left",
              caption="projected = images / epoch rate: no start-up, no per-epoch snapshots or checkpoints",
              caption_justify="left")
    for col in ("model", "epoch img/s", "epochs", "projected", "measured"):
        t.add_column(col, justify="left" if col == "model" else "right")
    run = sched.get("run") or {}
    for e in sched.get("estimates", []):
        meas = ""
        if run and run.get("model") == e["model"]:
            meas = f"[red]{run['error'][:40]}[/]" if run.get("error") else gb.hms(run.get("wall_s"))
        t.add_row(e["model"], gb.fmt(e.get("epoch_images_per_s")), gb.fmt(e.get("epochs")), gb.hms(e.get("projected_s")), meas)
    if run and run.get("model") not in {e["model"] for e in sched.get("estimates", [])}:
        t.add_row(run["model"], "", gb.fmt(run.get("epochs")), "",
                  f"[red]{run['error'][:40]}[/]" if run.get("error") else gb.hms(run.get("wall_s")))
    console.print(t)
    if run and "fit_s" in run:
        if run.get("error"):
            console.print(f"[red]schedule run {run['model']} {run['error']}: not a measurement of the schedule[/]")
        console.print(f"schedule run {run['model']}: wall {gb.hms(run['wall_s'])} (fit {gb.hms(run['fit_s'])}, "
                      f"steps at {gb.fmt(run.get('train_images_per_s'))} img/s, {run.get('epochs')} epoch ends "
                      f"~{gb.hms(run.get('epoch_end_s'))} = {gb.fmt(run.get('epoch_end_per_epoch_s'), '{:.3f}')} s each, "
                      f"checkpoint every {run.get('checkpoint_every')}, snapshot every {run.get('snapshot_every')})"
                      + (f"; run folder {run['run_dir']}" if run.get("run_dir") else ""))


# --------------------------------------------------------------------------------------------
# Sections and output
# --------------------------------------------------------------------------------------------


def _section_models(b: gb.Bench, names: list[str]) -> None:
    for name in names:
        gb.measure_and_log(b, name, SIZE)


def _section_schedule(b: gb.Bench) -> None:
    args, res, data = b.args, b.res, b.data
    sched: dict[str, Any] = {"images": args.schedule_images, "estimates": []}
    res["schedule"] = sched
    n128 = data.cache[SIZE].n_train if SIZE in data.cache and data.cache[SIZE].n_train else None
    n128 = n128 or (res.get("rates_from") or {}).get("n_train")
    for r in res["models"]:
        if r["size"] == SIZE and r.get("epoch_images_per_s"):
            sched["estimates"].append({
                "model": r["model"], "epoch_images_per_s": r["epoch_images_per_s"],
                "projected_s": args.schedule_images / r["epoch_images_per_s"],
                "epochs": math.ceil(args.schedule_images / n128) if n128 else None})
    if args.run_schedule:
        if b.device.type != "cuda":
            b.log("note: --run-schedule on the CPU will take a very long time")
        sched["run"] = run_schedule(args.run_schedule, data.get(SIZE), args.batch, args.schedule_images,
                                    b.device, args, b.tmp, b.log)


def _rates_from(path: str, names: list[str] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The 128 px model rows of a ``gan_throughput.py --json`` file (of ``names`` only, when given)."""
    res = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = [r for r in res.get("models", []) if r.get("size") == SIZE and (not names or r.get("model") in names)]
    if not rows:
        raise ValueError(f"{path} has no {SIZE} px model rows{' of ' + ' '.join(names) if names else ''} "
                         f"(run gan_throughput.py with --sizes {SIZE} --json)")
    data = res.get("data", {}).get(str(SIZE)) or {}
    return rows, {"path": str(path), "n_train": data.get("n_train"), "kind": data.get("kind"),
                  "device_name": res.get("env", {}).get("device_name")}


def print_tables(console, res: dict[str, Any], args) -> None:
    if res.get("rates_from"):
        rf = res["rates_from"]
        console.print(f"epoch rates from {rf['path']} ({rf.get('device_name', '?')}, {rf.get('n_train')} "
                      f"{rf.get('kind', '')} train images)", markup=False)
    for r in res["models"]:
        if r.get("error"):
            console.print(f"[red]error[/] {r['model']} {r['size']} px: {r['error']}")
    sched = res.get("schedule")
    if sched and (sched.get("estimates") or sched.get("run")):
        _schedule_table(console, sched)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    ap = gb.parser(__doc__)
    ap.add_argument("--models", nargs="+", help="GANs to project (default: every family == 'gan' model)")
    ap.add_argument("--epochs", type=int, help="fit() epochs for the epoch rate (default 2; --quick: 1)")
    g = ap.add_argument_group("schedule")
    g.add_argument("--schedule-images", type=int, default=1_700_000,
                   help=f"images of the schedule at {SIZE} px (default 1,700,000)")
    g.add_argument("--run-schedule", metavar="MODEL", help=f"really train MODEL at {SIZE} px for --schedule-images images")
    g.add_argument("--schedule-out", help="keep the --run-schedule run folder under this folder")
    g.add_argument("--skip-models", action="store_true", help="measure no epoch rates (e.g. --run-schedule only)")
    g.add_argument("--rates-from", metavar="JSON",
                   help=f"project from the {SIZE} px rows of a gan_throughput.py --json file instead of measuring")
    args = gb.parse(ap, argv)
    if args.schedule_images < 1:
        ap.error("--schedule-images must be >= 1")
    if args.skip_models and not args.run_schedule and not args.rates_from:
        ap.error("nothing to do: --skip-models needs --run-schedule MODEL or --rates-from JSON")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {"models": []}
    if args.rates_from:
        try:
            results["models"], results["rates_from"] = _rates_from(args.rates_from, args.models)
        except (OSError, ValueError) as exc:
            print(f"error: --rates-from: {exc}")
            return 2
    names = [] if args.skip_models or args.rates_from else (args.models or gb.gan_models())
    sections: list[tuple[str, gb.Section]] = [("models", lambda b: _section_models(b, names))] if names else []
    sections.append(("schedule", _section_schedule))
    projected = names or [r["model"] for r in results["models"]]
    return gb.run_bench(
        "gan_schedule", args, gans=names + ([args.run_schedule] if args.run_schedule else []),
        sizes=[SIZE] if names or args.run_schedule else [], sections=sections,
        header=f"{args.schedule_images:,} images at {SIZE} px; projected: {' '.join(projected) or '-'}"
               + (f" (batch {args.batch}, steps {args.steps} (+{args.warmup} warm-up), {args.epochs} epoch(s))"
                  if names else f" (rates from {args.rates_from})" if args.rates_from else "")
               + (f"; run: {args.run_schedule} (batch {args.batch})" if args.run_schedule else ""),
        tables=print_tables, results=results)


if __name__ == "__main__":
    sys.exit(main())
