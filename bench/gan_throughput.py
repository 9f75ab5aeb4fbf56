"""GAN training throughput: every registered GAN at 64/128/256 px vs a plain DCGAN step written here.

Usage (from the repository root; the package need not be installed)::

    PYTHONPATH=. python bench/gan_throughput.py [--models rawgan cgan] [--sizes 64 128 256]
        [--device auto|cpu|cuda] [--batch 128] [--data-root DIR | --data64 DIR ... | --prepare-from SRC]
        [--also-plain-bf16] [--ref-max-channels 512] [--json OUT.json]
    python bench/gan_throughput.py --quick --device cpu            # CPU smoke test

The comparison with pytorch/examples ``dcgan/main.py`` is ``bench/gan_vs_example.py``; the seed's
1.7 M-image schedule (projected from this script's ``--json``, or really trained) is
``bench/gan_schedule.py``. Data options and the measurement itself are shared with them
(``bench/_bench.py``: data per size, :func:`measure_model`).

Section **models** (it prints its elapsed time; the summary table comes last) - for each GAN
(``family == "gan"``) and size, with the model's *default* config (only ``data.path``,
``data.image_size``, ``train.batch_size``, ``train.device`` set, plus
``train.snapshot_every``/``train.checkpoint_every`` huge; ``--set key=value`` comes on top):

- *step*: ``--warmup`` then ``--steps`` timed calls of ``Trainer.train_step`` on one fixed
  batch already on the device (CUDA synchronised around the timed loop);
- *epoch*: the same trainer then runs ``fit()`` for ``--epochs`` more epochs (data order,
  indexing, logging, epoch ends included). Timed from the end of the first step to the end
  of the last step with the ``on_step`` callback (CUDA synchronised at both), so the
  run-start files and the last epoch's snapshot/checkpoint are outside the window;
- *ref*: a plain DCGAN step of the same size in the same process (below): ``x ref`` =
  model step rate / reference step rate.

Reference DCGAN (written here, following pytorch/examples ``dcgan/main.py``): G = ConvTranspose2d
stack (nz=100 -> 4x4, then stride-2 stages) with BatchNorm+ReLU and a Tanh output; D = Conv2d stack
with LeakyReLU(0.2) (+BatchNorm after the first layer), a 4x4 conv to one value and Sigmoid;
BCELoss; Adam(2e-4, betas (0.5, 0.999)); nc=1; fp32, eager, contiguous; cudnn.benchmark on (as the
example sets it). The example's step order: D(real) backward, D(fake.detach()) backward, D step,
then D(fake) backward, G step (G runs once per step). Its per-step ``.item()`` logging is left
out. Extension to 128/256 px, following the example's pattern of doubling the width at every
stage away from the image: with n = log2(size) - 2 stages, G widths are ngf * 2**(n-1) ... ngf
(64 px: 8,4,2,1 x ngf as in the example; 128 px: 16..1; 256 px: 32..1) and D widths ndf ... ndf *
2**(n-1). Unlike covidxray's DCGAN, the widths are not capped at 512 (``--ref-max-channels 512``
caps them the same way), so at 128/256 px the reference has wider low-resolution layers.
``--also-plain-bf16`` adds the reference under bf16 autocast + channels_last (BCE in fp32).
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/, also when loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as gb  # noqa: E402  (it puts the repository root on sys.path)
import torch  # noqa: E402
from torch import nn  # noqa: E402


# --------------------------------------------------------------------------------------------
# Reference: the PyTorch-examples DCGAN, extended to 128/256 px (see the module docstring)
# --------------------------------------------------------------------------------------------


def _ref_widths(size: int, base: int, cap: int | None) -> list[int]:
    n = int(math.log2(size)) - 2                       # stride-2 stages: 64 px -> 4 (as in the example)
    widths = [base * 2 ** (n - 1 - i) for i in range(n)]  # G: ngf*8, *4, *2, *1 at 64 px
    return [min(w, cap) for w in widths] if cap else widths


class RefGenerator(nn.Module):
    def __init__(self, size: int, nz: int = 100, ngf: int = 64, nc: int = 1, cap: int | None = None):
        super().__init__()
        w = _ref_widths(size, ngf, cap)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, w[0], 4, 1, 0, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(True)]
        for a, b in zip(w[:-1], w[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(w[-1], nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class RefDiscriminator(nn.Module):
    def __init__(self, size: int, ndf: int = 64, nc: int = 1, cap: int | None = None):
        super().__init__()
        w = _ref_widths(size, ndf, cap)[::-1]             # ndf, ndf*2, ... (mirror of G)
        layers: list[nn.Module] = [nn.Conv2d(nc, w[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for a, b in zip(w[:-1], w[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(w[-1], 1, 4, 1, 0, bias=False), nn.Sigmoid()]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1, 1).squeeze(1)


def _ref_init(m: nn.Module) -> None:
    name = m.__class__.__name__
    if name.find("Conv") != -1:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif name.find("BatchNorm") != -1:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def measure_reference(size: int, batch: int, device: torch.device, args, bf16_cl: bool = False) -> dict[str, Any]:
    """images/s of the plain DCGAN step (fp32 eager contiguous, or bf16 autocast + channels_last)."""
    old_bench = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True             # the example sets it
    try:
        torch.manual_seed(0)
        fmt = torch.channels_last if bf16_cl else torch.contiguous_format
        netG = RefGenerator(size, 100, args.ref_width, 1, args.ref_max_channels).to(device, memory_format=fmt)
        netD = RefDiscriminator(size, args.ref_width, 1, args.ref_max_channels).to(device, memory_format=fmt)
        netG.apply(_ref_init)
        netD.apply(_ref_init)
        criterion = nn.BCELoss()
        optD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
        optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
        real = (torch.rand(batch, 1, size, size, device=device) * 2 - 1).contiguous(memory_format=fmt)
        ones = torch.full((batch,), 1.0, device=device)
        zeros = torch.full((batch,), 0.0, device=device)
        use_amp = bf16_cl

        def ac():
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

        def step() -> None:
            # (1) D: maximise log D(x) + log(1 - D(G(z))); BCE outside autocast (it is autocast-unsafe)
            netD.zero_grad()
            with ac():
                out = netD(real)
            criterion(out.float(), ones).backward()
            noise = torch.randn(batch, 100, 1, 1, device=device)
            with ac():
                fake = netG(noise)
                out = netD(fake.detach())
            criterion(out.float(), zeros).backward()
            optD.step()
            # (2) G: maximise log D(G(z))
            netG.zero_grad()
            with ac():
                out = netD(fake)
            criterion(out.float(), ones).backward()
            optG.step()

        for _ in range(args.warmup):
            step()
        gb.sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        gb.sync(device)
        dt_s = time.perf_counter() - t0
        return {"size": size, "batch": batch, "variant": "bf16+channels_last" if bf16_cl else "fp32",
                "step_s": dt_s / args.steps, "images_per_s": gb.rate(args.steps * batch, dt_s),
                "params_G": sum(p.numel() for p in netG.parameters()),
                "params_D": sum(p.numel() for p in netD.parameters())}
    finally:
        torch.backends.cudnn.benchmark = old_bench
        gb.free(device)


# --------------------------------------------------------------------------------------------
# Section and output
# --------------------------------------------------------------------------------------------


def _section_models(b: gb.Bench, names: list[str]) -> None:
    args = b.args
    for size in args.sizes:
        for bf16 in [False] + ([True] if args.also_plain_bf16 else []):
            try:
                ref = measure_reference(size, args.batch, b.device, args, bf16_cl=bf16)
            except Exception as exc:
                ref = {"size": size, "batch": args.batch, "variant": "bf16+channels_last" if bf16 else "fp32",
                       "error": gb.short(exc)}
                traceback.print_exc(file=sys.stderr)
            b.res["reference"].append(ref)
            b.log(f"reference {size} px {ref['variant']}: "
                  + (f"ERROR {ref['error']}" if "error" in ref else f"{ref['images_per_s']:,.0f} img/s"))
        for name in names:
            gb.measure_and_log(b, name, size)


def print_tables(console, res: dict[str, Any], args) -> None:
    refs = {(r["size"], r["variant"]): r for r in res["reference"]}
    has_bf16 = any(v == "bf16+channels_last" for _, v in refs)
    if res["models"]:
        _models_table(console, res, args, refs, has_bf16)
    for r in res["reference"]:
        if r.get("error"):
            console.print(f"[red]reference {r['size']} px {r['variant']}: {r['error']}[/]")


def _models_table(console, res, args, refs, has_bf16) -> None:
    from rich.table import Table

    env, sec = res["env"], res["sections_s"]
    t = Table(title=f"GAN training img/s - {env['device_name']} ({env['device']}), batch {args.batch}, "
                    f"{gb.hms(sec.get('models'))}", title_justify="left")
    for col in ("model", "px", "data", "graphs", "step", "epoch", "ep/step", "ref fp32", "x ref"):
        t.add_column(col, justify="left" if col in ("model", "data") else "right")
    if has_bf16:
        t.add_column("ref bf16CL", justify="right")
    errors: list[str] = []
    for r in res["models"]:
        ref = refs.get((r["size"], "fp32"), {})
        ref_b = refs.get((r["size"], "bf16+channels_last"), {})
        ratio = (r["step_images_per_s"] / ref["images_per_s"]
                 if r.get("step_images_per_s") and ref.get("images_per_s") else None)
        if r.get("error"):
            cells = [r["model"], str(r["size"]), r.get("data", ""), "-", "[red]error[/]", "-", "-", "-", "-"]
            errors.append(f"{r['model']} {r['size']} px: {r['error']}")
        else:
            cells = [r["model"], str(r["size"]), r.get("data", ""), r.get("cuda_graphs", "?"),
                     gb.fmt(r.get("step_images_per_s")),
                     gb.fmt(r.get("epoch_images_per_s")), gb.fmt(r.get("epoch_over_step"), "{:.2f}"),
                     gb.fmt(ref.get("images_per_s")) if "error" not in ref else "err", gb.fmt(ratio, "{:.2f}x")]
        if has_bf16:
            cells.append(gb.fmt(ref_b.get("images_per_s")) if "error" not in ref_b else "err")
        t.add_row(*cells)
    console.print(t)
    for e in errors:
        console.print(f"[red]error[/] {e}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    ap = gb.parser(__doc__)
    ap.add_argument("--models", nargs="+", help="registered GANs to time (default: every family == 'gan' model)")
    ap.add_argument("--sizes", nargs="+", type=int, choices=(64, 128, 256), help="image sizes (default: 64 128 256; --quick: 64)")
    ap.add_argument("--epochs", type=int, help="fit() epochs for the epoch rate (default 2; --quick: 1)")
    g = ap.add_argument_group("reference DCGAN")
    g.add_argument("--also-plain-bf16", action="store_true", help="also time the reference under bf16 + channels_last")
    g.add_argument("--ref-width", type=int, default=64, help="ngf = ndf of the reference (default 64)")
    g.add_argument("--ref-max-channels", type=int, default=None,
                   help="cap the reference widths (default: none, the example's pattern; 512 = covidxray's cap)")
    return gb.parse(ap, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.models or gb.gan_models()
    return gb.run_bench(
        "gan_throughput", args, gans=names, sizes=args.sizes,
        sections=[("models", lambda b: _section_models(b, names))],
        header=f"batch {args.batch}, steps {args.steps} (+{args.warmup} warm-up), {args.epochs} epoch(s), "
               f"models {' '.join(names)}",
        tables=print_tables, results={"models": [], "reference": []})


if __name__ == "__main__":
    sys.exit(main())
