"""Class fidelity and diversity of trained GANs, measured against a classifier trained on real images.

Why: a conditional GAN can look fine on a grid and still be useless to a downstream classifier, either
because a class collapsed to a few images (low diversity) or because the classes came out alike (low
class fidelity). This script measures both for one or more run folders on the same footing:

* **GAN-test accuracy** (Shmelkov, Schmid & Alahari, "How good is my GAN?", ECCV 2018): a classifier is
  trained on the *real* training split (selected on the validation split, reported on the test split),
  then classifies generated images; the accuracy against the label the generator was asked for says
  whether the classes came out recognisable. High GAN-test with low diversity is the ACGAN failure
  (G draws the most classifiable image of each class), so both are reported together.
* **Diversity**: per class, the pixel standard deviation across ``-n`` latents (grey levels, 0-255),
  next to the same number for the real training images of that class.
* **GAN-train** (same paper), for conditional models: a classifier of the same kind trained on the ``-n``
  generated images per class only, selected on the real validation split, and its balanced accuracy on
  the real test split, next to the real-trained classifier's. It needs both fidelity and variety, and is
  the closest single number to "do these images help a classifier".
* For unconditional models: the class mix the classifier sees in the samples, next to the real mix.

The classifier (the package's ``smallcnn`` at ``--clf-size`` px, default 64) is trained ``--clf-seeds`` times; every
number is the mean ± std over those classifiers. Generated images of any size are area-resized to the
classifier's size. This is *not* FID and is not called so.

Example (CPU, two runs at 64 px)::

    python bench/gan_quality.py --data prepared64/ runs/00000-cgan runs/00001-acgan --json quality.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidxray.data.datasets import load_tensor_data, to_float  # noqa: E402
from covidxray.errors import CovidXrayError  # noqa: E402
from covidxray.generate import load_generator  # noqa: E402
from covidxray.utils import atomic_path  # noqa: E402

CLF_VERSION = 2  # bump when the classifier or its training changes (invalidates cached classifiers)
                 # 2: the package's smallcnn (same layers, new state_dict names)


def small_cnn(k: int, size: int) -> nn.Module:
    """The package's ``smallcnn`` classifier (covidxray.models.classifiers; dropout 0.3 from
    configs/smallcnn.yaml) for ``k`` classes at ``size`` px."""
    from covidxray.config import resolve_config
    from covidxray.models import DataSpec, get_model

    return get_model("smallcnn").build(resolve_config("smallcnn"), DataSpec(k, size))["net"]


def resize_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x 1 x S x S -> float [-1, 1] at ``size`` px (area resampling when shrinking)."""
    x = to_float(images)
    if x.shape[-1] != size:
        mode = "area" if x.shape[-1] > size else "bilinear"
        x = F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return x


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Training augmentation of the classifier: shifts of up to 1/8 of the side, brightness and contrast
    jitter. No horizontal flip (it swaps the anatomical sides)."""
    n, s = x.shape[0], x.shape[-1]
    shift = s // 8
    pad = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen, device=x.device)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen, device=x.device)
    ar = torch.arange(s, device=x.device)
    rows = (dy[:, None] + ar[None]).view(n, 1, s, 1).expand(n, 1, s, s + 2 * shift)
    pad = torch.gather(pad, 2, rows)
    cols = (dx[:, None] + ar[None]).view(n, 1, 1, s).expand(n, 1, s, s)
    x = torch.gather(pad, 3, cols)
    b = (torch.rand(n, 1, 1, 1, generator=gen, device=x.device) - 0.5) * 0.3
    c = 1 + (torch.rand(n, 1, 1, 1, generator=gen, device=x.device) - 0.5) * 0.4
    mean = x.mean((1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean + b).clamp(-1, 1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]) if len(x) else \
        torch.empty(0, dtype=torch.long, device=x.device)


def balanced_accuracy(pred: torch.Tensor, true: torch.Tensor, k: int) -> float:
    return sum(float((pred[true == c] == c).float().mean()) for c in range(k)) / k


def train_classifier(train_x, train_y, val_x, val_y, k: int, seed: int, epochs: int, device) -> nn.Module:
    """Class-balanced cross-entropy, AdamW + cosine schedule; keeps the epoch with the best
    balanced validation accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    model = small_cnn(k, train_x.shape[-1]).to(device)
    counts = torch.bincount(train_y, minlength=k).float()
    weight = (counts.sum() / (k * counts.clamp(min=1))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    batch = 64
    steps = epochs * math.ceil(len(train_x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    best, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen, device=device)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(augment(train_x[idx], gen)), train_y[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = balanced_accuracy(predict(model, val_x), val_y, k)
        if acc >= best:
            best, best_state = acc, {n: t.detach().clone() for n, t in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval()


def cached_classifier(args, splits, xs, ys, k: int, seed: int, dev) -> nn.Module:
    """Train a classifier, or reuse the one trained before on the same images with the same settings
    (kept in the prepared folder's ``.cache``; the key covers every image's bytes)."""
    h = hashlib.sha256(f"{CLF_VERSION}|{args.clf_size}|{args.clf_epochs}|{seed}|{splits['train'].classes}".encode())
    for s in ("train", "val"):
        h.update(splits[s].images.numpy().tobytes())
        h.update(splits[s].labels.numpy().tobytes())
    path = Path(args.data) / ".cache" / f"gan_quality-clf-{h.hexdigest()[:16]}.pt"
    model = small_cnn(k, args.clf_size).to(dev)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location=dev, weights_only=True))
        return model.eval()
    model = train_classifier(xs["train"], ys["train"], xs["val"], ys["val"], k, seed, args.clf_epochs, dev)
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def fmt(ms: tuple[float, float], pct: bool = True) -> str:
    m, s = ms
    return f"{100 * m:.0f} ± {100 * s:.0f} %" if pct else f"{m:.1f} ± {s:.1f}"


def diversity(images_u8: torch.Tensor) -> float:
    """Mean over pixels of the standard deviation across images, in grey levels."""
    return float(images_u8.float().std(0).mean()) if len(images_u8) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="run folders (or checkpoint files) of trained GANs")
    ap.add_argument("--data", required=True, help="prepared folder with train/val/test splits (any size)")
    ap.add_argument("-n", type=int, default=256, help="generated images per class (default 256)")
    ap.add_argument("--clf-size", type=int, default=64, help="classifier input size in px (default 64)")
    ap.add_argument("--clf-epochs", type=int, default=30)
    ap.add_argument("--clf-seeds", type=int, default=3, help="classifiers trained (mean ± std over them)")
    ap.add_argument("--gan-train", action=argparse.BooleanOptionalAction, default=True,
                    help="also train a classifier on each conditional run's images and test it on real test images")
    ap.add_argument("--seed", type=int, default=0, help="latent seed of the generated images")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write all numbers to this file")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    t0 = time.perf_counter()

    splits = {s: load_tensor_data(args.data, s) for s in ("train", "val", "test")}
    classes = splits["train"].classes
    k = len(classes)
    xs = {s: resize_u8(d.images, args.clf_size).to(dev) for s, d in splits.items()}
    ys = {s: d.labels.to(dev) for s, d in splits.items()}
    clfs = [cached_classifier(args, splits, xs, ys, k, seed, dev) for seed in range(args.clf_seeds)]
    preds = [predict(m, xs["test"]) for m in clfs]
    yt = ys["test"]
    real = {"test_accuracy": mean_std([float((p == yt).float().mean()) for p in preds]),
            "test_balanced_accuracy": mean_std([balanced_accuracy(p, yt, k) for p in preds]),
            "test_per_class": {c: mean_std([float((p[yt == i] == i).float().mean()) for p in preds])
                               for i, c in enumerate(classes)},
            "train_diversity": {c: diversity(splits["train"].images[splits["train"].labels == i])
                                for i, c in enumerate(classes)},
            "train_mix": {c: float((splits["train"].labels == i).float().mean()) for i, c in enumerate(classes)}}
    print(f"classifier ({args.clf_seeds} seeds, {args.clf_size} px, {time.perf_counter() - t0:.0f} s): real test "
          f"accuracy {fmt(real['test_accuracy'])}, balanced {fmt(real['test_balanced_accuracy'])}; per class "
          + ", ".join(f"{c} {fmt(v)}" for c, v in real["test_per_class"].items()))
    print("real train diversity: " + ", ".join(f"{c} {v:.1f}" for c, v in real["train_diversity"].items()))

    results = []
    for run in args.runs:
        lg = load_generator(run)
        row = {"run": str(run), "model": lg.cfg.model.name, "size": lg.G.image_size, "weights": lg.weights,
               "kimg": round(int(lg.checkpoint.get("images_seen", 0)) / 1000, 3)}
        if lg.conditional:
            missing = [c for c in lg.classes if c not in classes]
            if missing:
                print(f"{run}: classes {missing} are not in {args.data}; skipped")
                continue
            per_class, accs_all, gen_x, gen_y = {}, [], [], []
            for c in lg.classes:
                imgs = lg.sample(args.n, seed=args.seed, device=dev, label=lg.label_index(c))
                x = resize_u8(imgs, args.clf_size).to(dev)
                accs = [float((predict(m, x) == classes.index(c)).float().mean()) for m in clfs]
                accs_all.append(accs)
                per_class[c] = {"gan_test": mean_std(accs), "diversity": diversity(imgs)}
                gen_x.append(x)
                gen_y.append(torch.full((len(x),), classes.index(c), dtype=torch.long, device=dev))
            row["per_class"] = per_class
            row["gan_test"] = mean_std([sum(a[i] for a in accs_all) / len(accs_all) for i in range(len(clfs))])
            if args.gan_train:
                # GAN-train: a classifier trained on the generated images only (selected on the real
                # validation split), tested on the real test split - needs both fidelity and variety.
                gx, gy = torch.cat(gen_x), torch.cat(gen_y)
                accs = []
                for seed in range(args.clf_seeds):
                    m = train_classifier(gx, gy, xs["val"], ys["val"], k, seed, args.clf_epochs, dev)
                    accs.append(balanced_accuracy(predict(m, xs["test"]), ys["test"], k))
                row["gan_train"] = mean_std(accs)
        else:
            imgs = lg.sample(args.n * k, seed=args.seed, device=dev)
            x = resize_u8(imgs, args.clf_size).to(dev)
            mixes = [torch.bincount(predict(m, x), minlength=k).float().div(len(x)).tolist() for m in clfs]
            row["mix"] = {c: mean_std([mx[i] for mx in mixes]) for i, c in enumerate(classes)}
            row["diversity"] = diversity(imgs)
        results.append(row)
        if "per_class" in row:
            gt = f"GAN-train {fmt(row['gan_train'])}, " if "gan_train" in row else ""
            print(f"{row['model']:9s} {run}: {gt}GAN-test {fmt(row['gan_test'])}; " + "; ".join(
                f"{c} {fmt(v['gan_test'])} div {v['diversity']:.1f}" for c, v in row["per_class"].items()))
        else:
            print(f"{row['model']:9s} {run}: diversity {row['diversity']:.1f}; predicted mix " + ", ".join(
                f"{c} {fmt(v)}" for c, v in row["mix"].items()))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"args": vars(args), "classes": classes, "real": real, "runs": results},
                                      indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CovidXrayError as exc:  # a missing run or data folder: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
