"""Generating images from a trained checkpoint (used by ``sample``, ``demo`` and evaluation)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from covidxray.checkpoint import load_checkpoint
from covidxray.config import Config
from covidxray.data.datasets import to_uint8
from covidxray.errors import CovidXrayError
from covidxray.infer.load import build_from_checkpoint
from covidxray.models.registry import get_model


@dataclass
class LoadedGenerator:
    """A generator ready to sample: the network (eval mode), its config and which weights were used."""

    G: nn.Module
    cfg: Config
    weights: str  # "G_ema" or "G"
    checkpoint: dict

    @property
    def classes(self) -> list[str]:
        return list(self.checkpoint.get("classes", []))

    @property
    def conditional(self) -> bool:
        return getattr(self.G, "n_classes", 0) > 0

    def label_index(self, name: str) -> int:
        """Index of a class name of a conditional model; a clear error lists the valid names."""
        if not self.conditional:
            raise CovidXrayError(
                f"model '{self.cfg.model.name}' is not class-conditional (trained on {', '.join(self.classes)} merged)",
                "Drop --class, or train a conditional model such as cgan",
            )
        if name not in self.classes:
            raise CovidXrayError(f"unknown class '{name}'; this model knows: {', '.join(self.classes)} (or all)")
        return self.classes.index(name)

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, batch_size: int = 256, device: str | torch.device = "cpu",
               label: int | None = None, temperature: float = 1.0, only=None) -> torch.Tensor:
        """``n`` uint8 images (n x 1 x S x S); the same seed (and label) gives the same images.

        Args:
            n: number of images.
            seed: latent seed.
            batch_size: images per forward pass.
            device: where to run G.
            label: class index for a conditional model (required there, refused otherwise).
            temperature: scale of the latents (1 = the prior; < 1 trades diversity for typical images).
            only: indices (in ``range(n)``) of the images to draw; image i is the same with or without
                ``only`` (all ``n`` latents are drawn, G runs in eval mode), so an interrupted ``sample``
                resumes exactly.
        """
        if not (math.isfinite(temperature) and temperature > 0):
            raise CovidXrayError(f"--temperature must be a finite number > 0, got {temperature:g}")
        if self.conditional and label is None:
            raise CovidXrayError(f"model '{self.cfg.model.name}' is class-conditional: choose a class "
                                 f"({', '.join(self.classes)} or all)")
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.cfg.arch.latent_dim, generator=gen) * temperature
        y = torch.full((n,), label, dtype=torch.long) if self.conditional else None
        if only is not None:
            idx = torch.as_tensor(list(only), dtype=torch.long)
            z, y = z[idx], (y[idx] if y is not None else None)
        return generate_images(self.G.to(device), z, y, device, batch_size)


@torch.no_grad()
def generate_images(G: nn.Module, z: torch.Tensor, y: torch.Tensor | None, device: str | torch.device,
                    batch_size: int = 256) -> torch.Tensor:
    """uint8 images (N x 1 x S x S, on the CPU) from latents and labels, batched, G in eval mode.

    Eval mode makes BatchNorm use its running statistics, so an image does not depend on the
    others in its batch; G's previous mode is restored afterwards.
    """
    was_training = G.training
    G.eval()
    try:
        out = []
        for i in range(0, len(z), batch_size):
            yi = y[i:i + batch_size].to(device) if y is not None else None
            out.append(to_uint8(G(z[i:i + batch_size].to(device), yi)).cpu())
    finally:
        G.train(was_training)
    if not out:
        return torch.empty(0, 1, G.image_size, G.image_size, dtype=torch.uint8)
    return torch.cat(out)


def load_generator(checkpoint: str | os.PathLike, checkpoint_data: dict | None = None) -> LoadedGenerator:
    """Rebuild G from a checkpoint (file or run folder; or ``checkpoint_data``, the checkpoint the caller
    already loaded from it); prefers the EMA weights when present."""
    ckpt = checkpoint_data if checkpoint_data is not None else load_checkpoint(checkpoint)
    if ckpt["family"] == "autoencoder":
        return _load_vae_decoder(ckpt)
    if ckpt["family"] == "image2image":
        raise CovidXrayError(f"{ckpt['path']} holds a pix2pix model: it translates masks, it has no latent to sample",
                             "Pass --from-data PREPARED (its masks, optionally --deform) or --masks FOLDER")
    if ckpt["family"] != "gan":
        raise CovidXrayError(f"{ckpt['path']} holds a {ckpt['family']} model ('{ckpt.get('model')}'); "
                             f"`sample` needs a GAN or a VAE")
    nets, cfg = build_from_checkpoint(ckpt, "gan")
    G = nets["G"]
    weights = "G_ema" if "G_ema" in ckpt["models"] else "G"
    G.load_state_dict(ckpt["models"][weights])
    G.eval()
    return LoadedGenerator(G, cfg, weights, ckpt)


def _load_vae_decoder(ckpt: dict) -> LoadedGenerator:
    """A VAE's decoder as a generator: it maps prior draws z ~ N(0, I) (and classes, for a cVAE) to images."""
    nets, cfg = build_from_checkpoint(ckpt, "autoencoder")
    spec = get_model(cfg.model.name)
    if "prior" not in spec.features:
        from covidxray.models.registry import list_models

        priors = ", ".join(m.name for m in list_models("autoencoder") if "prior" in m.features)
        raise CovidXrayError(f"{ckpt['path']} holds a '{spec.name}', which has no prior to sample from",
                             f"Train a model with a prior ({priors}) to generate images")
    net = nets["net"]
    net.load_state_dict(ckpt["models"]["net"])
    net.eval()
    return LoadedGenerator(net.decoder, cfg, "net", ckpt)


def sample_name(i: int, prefix: str = "sample") -> str:
    """The file name of image ``i`` of a ``sample`` folder."""
    return f"{prefix}_{i:05d}.png"


def write_samples(images: torch.Tensor, out: Path, prefix: str = "sample", indices=None) -> list[Path]:
    """Write each uint8 image as ``<out>/<prefix>_00000.png`` … (atomically; ``indices`` name them)."""
    from covidxray.data.imaging import save_png

    indices = range(len(images)) if indices is None else indices
    return [save_png(img[0], out / sample_name(i, prefix)) for i, img in zip(indices, images)]
