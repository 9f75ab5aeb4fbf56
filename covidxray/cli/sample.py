"""``covidxray sample``: write N generated images (and optionally a grid) from a checkpoint."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from covidxray.cli._common import GUIDANCE_OPTION, SAMPLER_OPTION, STEPS_OPTION, Number, console, user_errors
from covidxray.errors import CovidXrayError


@user_errors
def sample_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint .pt file, or a run folder (best.pt when the run selected one, else last.pt) of a GAN, vae, cvae or pix2pix."),
    out: Path = typer.Argument(..., help="Folder for the PNGs."),
    n: int = typer.Option(64, "-n", "--num", help="Number of images.", parser=Number(int, ge=1)),
    seed: int = typer.Option(0, "--seed", help="Latent seed: the same seed gives the same images."),
    grid: bool = typer.Option(False, "--grid", help="Also write grid.png with all images."),
    class_: Optional[str] = typer.Option(None, "--class", help="Conditional models: a class name or 'all' "
                                         "(N images per class, one folder each) [default: all; pix2pix --from-data: "
                                         "each mask's own class]."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images generated per forward pass.",
                                   parser=Number(int, ge=1)),
    temperature: float = typer.Option(1.0, "--temperature", help="Scale of the latent draws (1 = the prior; "
                                      "< 1: more typical, less diverse images).", parser=Number(float, gt=0, le=100)),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    steps: Optional[int] = STEPS_OPTION,
    guidance: Optional[float] = GUIDANCE_OPTION,
    sampler: Optional[str] = SAMPLER_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Draw anew into a folder that holds samples of other "
                                   "settings (their sample_*.png files are replaced; nothing else is touched). "
                                   "Without it, the same command resumes an interrupted run."),
    reconstruct: Optional[Path] = typer.Option(None, "--reconstruct", help="Autoencoders: reconstruct the X-rays of "
                                               "this folder instead (input | reconstruction PNGs, reconstruct.csv)."),
    from_data: Optional[Path] = typer.Option(None, "--from-data", help="pix2pix: translate the masks of this prepared "
                                             "folder's --split into paired (X-ray, mask) data in the prepared layout."),
    split: str = typer.Option("train", "--split", help="--from-data: the split whose masks are used."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="pix2pix: translate a folder of mask images instead."),
    deform: bool = typer.Option(False, "--deform", help="pix2pix: deform each mask smoothly first (new anatomies)."),
    copies: int = typer.Option(1, "--copies", help="pix2pix: pairs per mask (each deformed and drawn anew).",
                               parser=Number(int, ge=1)),
    mix: bool = typer.Option(False, "--mix", help="pix2pix --from-data: also copy the real training images into OUT "
                             "(real + synthetic pairs)."),
    images: Optional[Path] = typer.Option(None, "--images", help="pix2pix colorize runs: render the X-rays of this "
                                          "folder in pseudo-colour."),
) -> None:
    """Generate N grayscale PNGs at the training size from a GAN (its EMA generator when it has one) or a VAE's
    prior.

    An interrupted run (Ctrl-C, a kill) resumes when the same command is run again: the images already written
    are kept and the others drawn, the same as an uninterrupted run would have written them.
    """
    import torch

    from covidxray.data.grids import grid_nrow, save_grid
    from covidxray.infer.generate import load_generator, sample_name, write_samples
    from covidxray.outdir import check_output_dir, claim, read_marker
    from covidxray.utils import resolve_device, sweep_stale_temps

    if (images is not None or reconstruct is not None) and any(v is not None for v in (steps, guidance, sampler)):
        raise CovidXrayError("--steps, --guidance and --sampler set a diffusion model's sampler; --images and "
                             "--reconstruct do not draw from one", "Drop them")
    if images is not None:
        from covidxray.infer.synthesize import colorize_folder

        res = colorize_folder(checkpoint, images, out, batch_size=min(batch_size, 64), device=device, seed=seed,
                              log=lambda msg: console().print(msg, highlight=False, markup=False))
        bad = len(res["unreadable"])
        console().print(f"wrote {res['colorized']} pseudo-colour renderings to {res['out']}"
                        + (f" ({bad} unreadable, listed above)" if bad else ""), highlight=False, markup=False,
                        soft_wrap=True)
        return
    if from_data is not None or masks is not None:
        from covidxray.infer.synthesize import synthesize_pairs

        res = synthesize_pairs(checkpoint, out, from_data=from_data, split=split, masks=masks, deform=deform,
                               copies=copies, mix=mix, seed=seed, batch_size=min(batch_size, 64), device=device,
                               class_name=class_, overwrite=overwrite,
                               sampling=dict(steps=steps, guidance=guidance, sampler=sampler), log=lambda msg: console().print(msg, highlight=False, markup=False))
        real = res["real_copied"]
        console().print(f"wrote {res['pairs']} synthetic (X-ray, mask) pairs into the train split of {res['out']}"
                        f"{' with deformed masks' if deform else ''}; real images copied: {real['train']} train, "
                        f"{real['val']} val, {real['test']} test (train a segmenter: covidxray train --model unet "
                        f"--data {res['out']})", highlight=False, markup=False, soft_wrap=True)
        return
    if reconstruct is not None:
        return _reconstruct(checkpoint, reconstruct, out, class_, batch_size, device, grid, temperature)
    loaded = load_generator(checkpoint)
    check_output_dir(out, "sample", legacy=("sample_*.png", "grid.png", *loaded.classes), option="OUT")
    extra = loaded.configure(steps=steps, guidance=guidance, sampler=sampler)  # the sampler settings in force
    dev = resolve_device(device)
    if loaded.conditional:
        names = loaded.classes if class_ in (None, "all") else [class_]
        jobs = [(name, out / name, loaded.label_index(name)) for name in names]
    else:
        if class_ is not None:
            loaded.label_index(class_)  # raises: not a conditional model
        jobs = [(None, out, None)]
    settings = {"checkpoint": str(Path(loaded.checkpoint["path"]).resolve()), "step": int(loaded.checkpoint.get("step", 0)),
                "weights": loaded.weights, "n": n, "seed": seed, "temperature": temperature,
                "classes": [name for name, _, _ in jobs], **extra}
    old = read_marker(out)
    if old is not None and old.get("settings") not in (None, settings) and not overwrite:
        diff = ", ".join(f"{k} {old['settings'].get(k)} -> {v}" for k, v in settings.items()
                         if old["settings"].get(k) != v)
        raise CovidXrayError(f"{out} holds samples drawn with other settings ({diff})",
                             "Run the earlier command again to resume it, choose another OUT, or pass --overwrite")
    if old is None and not overwrite:  # a folder of samples written before the marker: settings unknown
        for name, folder, label in jobs:
            if folder.is_dir() and any(folder.glob("sample_*.png")):
                raise CovidXrayError(f"{folder} already holds sample_*.png files", "Choose another OUT or pass --overwrite")
    con = console()
    sweep_stale_temps(out)
    if overwrite or old is None or old.get("settings") != settings:  # a new draw: earlier samples go
        for name, folder, label in jobs:
            for stale in folder.glob("sample_*.png") if folder.is_dir() else []:
                stale.unlink()
            with contextlib.suppress(FileNotFoundError):
                (folder / "grid.png").unlink()
    claim(out, "sample", "sample", settings)
    for name, folder, label in jobs:
        folder.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(folder)
        todo = [i for i in range(n) if not (folder / sample_name(i)).is_file()]
        for k in range(0, len(todo), batch_size):  # written batch by batch: an interrupt loses one batch at most
            chunk = todo[k:k + batch_size]
            images = loaded.sample(n, seed=seed, batch_size=batch_size, device=dev, label=label,
                                   temperature=temperature, only=chunk)
            write_samples(images, folder, indices=chunk)
        what = f"class {name}, " if name else ""
        resumed = f", {n - len(todo)} already there" if len(todo) < n else ""
        msg = (f"wrote {len(todo)} images{resumed} ({what}{loaded.image_size} px, {settings['checkpoint']} "
               f"weights {loaded.weights}, seed {seed}) to {folder}")
        if grid:
            import numpy as np
            from PIL import Image

            def read(path):
                with Image.open(path) as im:
                    return torch.from_numpy(np.array(im.convert("L")))[None]

            # the PNGs are lossless: the grid shows the same images, also after a resume
            images = torch.stack([read(folder / sample_name(i)) for i in range(n)])
            msg += f"; grid {save_grid(images, folder / 'grid.png', nrow=grid_nrow(n))}"
        con.print(msg, highlight=False)


def _reconstruct(checkpoint, folder, out, class_, batch_size, device, grid, temperature) -> None:
    from covidxray.infer.reconstruct import reconstruct_folder

    if grid or temperature != 1.0:
        raise CovidXrayError("--grid and --temperature do not go with --reconstruct",
                             "Drop them: --reconstruct writes one input | reconstruction PNG per image")
    res = reconstruct_folder(checkpoint, folder, out, class_name=class_, batch_size=batch_size, device=device)
    bad = res["unreadable"]
    mean = (f"; mean PSNR {res['mean_psnr']:.2f} dB, SSIM {res['mean_ssim']:.3f}" if res["reconstructed"] else "")
    console().print(f"reconstructed {res['reconstructed']} images with {res['model']} ({res['checkpoint']}) into "
                    f"{res['out']}{mean}; "
                    f"table {res['csv']}", highlight=False, markup=False, soft_wrap=True)
    if bad:
        shown = "; ".join(f"{f} ({why})" for f, why in bad[:5])
        console().print(f"unreadable ({len(bad)}): {shown}{' ...' if len(bad) > 5 else ''}", highlight=False,
                        markup=False, soft_wrap=True)
