"""Where generated images come from for ``evaluate``: a trained generator, or a folder of PNGs.

Both give uint8 images (N x 1 x S x S) with labels (class indices into ``classes``) when the source is
class-conditional (a conditional GAN; a folder with one sub-folder per class) and ``None`` otherwise.
A generator makes its images on the device and they are never written to disk unless asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from covidxray.data.datasets import decode_generated, generated_image_files, load_tensor_data, resize_masks, resize_u8
from covidxray.data.transforms import deform_masks
from covidxray.errors import CovidXrayError
from covidxray.infer.predict import iter_mask_probs, load_segmenter
from covidxray.infer.protocol import Generator, MaskTranslator
from covidxray.metrics.segmentation import dice, summarize


@dataclass
class Source:
    """A source of generated images (see the module docstring)."""

    kind: str                       # "checkpoint" | "folder"
    name: str                       # the model's name, or the folder's
    path: str
    image_size: int
    classes: list[str]              # the source's classes (conditional), else those it was trained on
    conditional: bool
    info: dict[str, Any] = field(default_factory=dict)

    def draw(self, counts: list[int] | int, seed: int, device: torch.device, batch_size: int = 256
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @property
    def n_available(self) -> int | None:
        """How many distinct images the source holds (None: unlimited)."""
        return None


class GeneratorSource(Source):
    """Samples of a trained :class:`~covidxray.infer.protocol.Generator` (a GAN's EMA weights when present, a
    VAE's decoder...), drawn with ``seed``."""

    def __init__(self, g: Generator):
        ck = g.checkpoint
        info = {"checkpoint": str(Path(ck["path"]).resolve()), "epoch": int(ck.get("epoch", 0)),
                "step": int(ck.get("step", 0)), "weights": g.weights,
                "kimg": round(float(ck.get("images_seen", 0)) / 1000, 1) if ck.get("images_seen") else None,
                "training_data": g.cfg.data.path}
        super().__init__("checkpoint", g.cfg.model.name, info["checkpoint"], g.image_size,
                         g.classes, g.conditional, info)
        self.loaded = g

    def draw(self, counts, seed, device, batch_size=256):
        return self.loaded.draw(counts, seed, device, batch_size)


class FolderSource(Source):
    """Every image under a folder (recursively); sub-folders named like classes label their images."""

    def __init__(self, folder: str | os.PathLike, data_classes: list[str], skip_unreadable: bool = False,
                 log=None):
        folder = Path(folder)
        if not folder.is_dir():
            raise CovidXrayError(f"--fake {folder} is not a folder", "Pass a folder of generated PNGs "
                                 "(e.g. the OUT of `covidxray sample`)")
        files = generated_image_files(folder)
        if not files:
            raise CovidXrayError(f"--fake {folder} holds no images (.png .jpg .jpeg .bmp .tif .tiff)",
                                 "Write samples first: `covidxray sample RUN FOLDER -n 1000`")
        tops = {p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1}
        conditional = bool(tops) and tops <= set(data_classes) and all(
            len(p.relative_to(folder).parts) > 1 for p in files)
        if tops and not conditional and log:
            unknown = sorted(tops - set(data_classes))
            log(f"note: sub-folders of {folder} are not all class names of the data ({', '.join(unknown[:5])}): "
                f"its images are evaluated as one unlabelled set")
        classes = sorted(tops) if conditional else list(data_classes)
        arrays, kept, bad = decode_generated(files, f"--fake {folder}", skip_unreadable,
                                             "Remove or regenerate them, or pass --skip-unreadable to evaluate the "
                                             "rest (they are listed in metrics.json)")
        labels = [classes.index(p.relative_to(folder).parts[0]) for p in kept] if conditional else []
        if not arrays:
            raise CovidXrayError(f"no readable image in --fake {folder}")
        size = int(arrays[0].shape[0])
        super().__init__("folder", folder.name, str(folder.resolve()), size, classes, conditional,
                         {"files": len(arrays), "unreadable": [{"file": f, "reason": r} for f, r in bad]})
        self.images = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
        self.labels = torch.tensor(labels, dtype=torch.long) if conditional else None
        if bad and log:
            log(f"warning: {len(bad)} unreadable files in {folder} left out (listed in metrics.json), "
                f"e.g. {bad[0][0]}: {bad[0][1]}")

    @property
    def n_available(self) -> int:
        return int(self.images.shape[0])

    def class_available(self) -> list[int]:
        if self.labels is None:
            return [self.n_available]
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def draw(self, counts, seed, device, batch_size=256):
        """A random subset without replacement (all images, in order, when the counts ask for all)."""
        g = torch.Generator().manual_seed(seed)
        if isinstance(counts, int):
            idx = torch.arange(counts) if counts >= self.n_available else torch.randperm(self.n_available,
                                                                                          generator=g)[:counts]
            return self.images[idx], (self.labels[idx] if self.labels is not None else None)
        parts = []
        for k, n in enumerate(counts):
            pool = (self.labels == k).nonzero().flatten()
            parts.append(pool if n >= len(pool) else pool[torch.randperm(len(pool), generator=g)[:n]])
        idx = torch.cat(parts)
        return self.images[idx], self.labels[idx]


class MaskSource(Source):
    """X-rays of a model that draws them from lung masks (a :class:`~covidxray.infer.protocol.MaskTranslator`,
    such as a pix2pix ``mask2xray`` run), drawn from the lung masks of its training split: each draw picks
    masks at random (``seed``), deforms each smoothly (as ``sample --deform``) so that a draw of any size has new
    anatomies, and translates them with G's dropout noise seeded too. A class-conditional run (class maps) is a
    conditional source: the images of class k come from masks of class-k training images (all masks when that
    class has none), with class k's maps. ``last_masks`` keeps the masks of the latest draw (for the
    mask-consistency score)."""

    def __init__(self, loaded: MaskTranslator):
        cfg, ck = loaded.cfg, loaded.checkpoint
        size = int(ck["image_size"])
        try:
            td = load_tensor_data(cfg.data.path, cfg.data.split, cfg.data.classes or None, None, True, masks=True)
        except CovidXrayError as exc:
            raise CovidXrayError(f"the masks pix2pix draws from are unavailable: {exc.message}",
                                 "Evaluate where the run's training data (data.path in its config.yaml) are") from None
        masks = td.masks if td.masks.shape[-1] == size else resize_masks(td.masks, size)
        conditioned = loaded.conditioning
        info = {"checkpoint": str(Path(ck["path"]).resolve()), "epoch": int(ck.get("epoch", 0)),
                "step": int(ck.get("step", 0)), "weights": "G (dropout on)", "training_data": cfg.data.path,
                "masks": f"{len(masks)} masks of the {cfg.data.split} split, deformed per draw"
                         + (", of the class drawn" if conditioned else "")}
        super().__init__("checkpoint", cfg.model.name, info["checkpoint"], size,
                         conditioned or list(td.classes), bool(conditioned), info)
        self.loaded, self.masks = loaded, masks
        # Each conditioned class's pool of masks (indices into self.masks), by class name of the training data.
        own = [td.classes[int(k)] for k in td.labels]
        self.pools = [torch.tensor([i for i, c in enumerate(own) if c == name] or list(range(len(own))))
                      for name in conditioned]
        self.last_masks: torch.Tensor | None = None

    def draw(self, counts, seed, device, batch_size=256):
        gen = torch.Generator().manual_seed(seed)
        if isinstance(counts, int):
            if self.conditional:
                raise ValueError("a conditional generator needs per-class counts")
            idx, labels = torch.randint(len(self.masks), (counts,), generator=gen), None
        else:
            idx = torch.cat([pool[torch.randint(len(pool), (n,), generator=gen)]
                             for pool, n in zip(self.pools, counts)])
            labels = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(counts)])
        masks = deform_masks(self.masks[idx], gen)
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(seed)
            images = self.loaded.translate_masks(masks, labels, device, batch_size)
        self.last_masks = masks
        return images, labels


def mask_consistency(images_u8: torch.Tensor, masks: torch.Tensor, segmenter: str | os.PathLike,
                     device: torch.device, batch_size: int = 64) -> dict[str, Any]:
    """Dice between the masks a pix2pix run was given and a trained U-Net's masks of the X-rays it drew from them
    (both at the images' side; the U-Net's input resized when its side differs), summarised over the images."""

    seg = load_segmenter(segmenter, "--segmenter")
    side, size = int(images_u8.shape[-1]), seg.image_size
    x = images_u8 if side == size else resize_u8(images_u8, size)
    net = seg.net.to(device)
    preds = []
    for _, probs in iter_mask_probs(net, x, device, batch_size):
        if side != size:
            probs = F.interpolate(probs, size=(side, side), mode="bilinear", align_corners=False)
        preds.append((probs > seg.threshold).cpu())
    d = dice(torch.cat(preds)[:, 0].numpy(), masks[:, 0].numpy() > 0)
    return {"segmenter": str(Path(seg.checkpoint["path"]).resolve()), "model": seg.cfg.model.name,
            "dice": summarize(d), "n": int(len(d))}
