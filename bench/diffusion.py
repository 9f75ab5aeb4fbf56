"""Diffusion speed: covidxray's ``edm`` against MONAI's ``DiffusionModelUNet`` + ``DDPMScheduler`` (training) and
``DDIMScheduler`` (sampling), side by side in one process, on the same images, batch and device.

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

No FID is computed here: the quality from the same budget needs trained models (issue 20's real-data rows).
"""

from __future__ import annotations

import argparse
import json
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
from covidxray.data.datasets import to_float  # noqa: E402
from covidxray.infer.predict import inference_settings  # noqa: E402
from covidxray.models import diffusion as edm  # noqa: E402
from covidxray.train.loop import Trainer  # noqa: E402
from covidxray.utils import resolve_device  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def monai_unet(channels: tuple[int, ...]):
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=channels,
                              attention_levels=(False,) * len(channels), num_res_blocks=1,
                              norm_num_groups=8)


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="A prepared folder (covidxray prepare); its train split is used.")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="Timed optimisation steps per round.")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sample-n", type=int, default=16)
    ap.add_argument("--monai-channels", default="32,64,96",
                    help="MONAI's channels per level (1.69 M parameters against edm's 1.73 M at the defaults).")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", nargs="*", default=[], help="Overrides of edm's config (key=value).")
    ap.add_argument("--quick", action="store_true", help="Tiny settings: a smoke test.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds, args.sample_n, args.batch = 2, 1, 1, 2, 8
        args.monai_channels = "8,16"
        args.set = list(args.set) + ["arch.channels=8", "arch.depth=2"]
    device = resolve_device(args.device)
    _, amp = inference_settings(device)

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
        from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

        channels = tuple(int(c) for c in args.monai_channels.split(","))
        net = monai_unet(channels).to(device, memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr)
        sched = DDPMScheduler(num_train_timesteps=1000)
        x0 = to_float(images).contiguous(memory_format=torch.channels_last)
        g = torch.Generator(device=device).manual_seed(0)

        def monai_step():
            noise = torch.randn(x0.shape, generator=g, device=device)
            t = torch.randint(0, 1000, (x0.shape[0],), generator=g, device=device)
            noisy = sched.add_noise(original_samples=x0, noise=noise, timesteps=t)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                pred = net(noisy, timesteps=t)
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

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
        ddim = DDIMScheduler(num_train_timesteps=1000)
        ddim.set_timesteps(50)
        net.eval()
        x = noise.clone()
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            for t in ddim.timesteps:
                out = net(x, timesteps=torch.full((n,), int(t), device=device)).float()
                x, _ = ddim.step(out, t, x)
        _sync(device)
        monai_s = (time.perf_counter() - t0) / n
        sample = {"n": n, "ours_s_per_image": ours_s, "ours_evaluations": edm.network_evaluations(18),
                  "monai_s_per_image": monai_s, "monai_evaluations": 50}

    res = {"device": str(device), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "size": args.size, "batch": args.batch, "train": train, "sample": sample,
           "date": time.strftime("%Y-%m-%d")}
    print(f"train  {args.size} px, batch {args.batch}, {train['amp']}: ours {train['ours_img_per_s']:.1f} img/s "
          f"({train['ours_params'] / 1e6:.2f} M params), MONAI {train['monai_img_per_s']:.1f} img/s "
          f"({train['monai_params'] / 1e6:.2f} M params): {train['ratio']:.2f}x")
    print(f"sample {n} images: ours {ours_s:.3f} s/image (18 Heun steps, 35 evaluations), MONAI DDIM "
          f"{monai_s:.3f} s/image (50 evaluations)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
