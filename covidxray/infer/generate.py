"""Generating images from a trained checkpoint (used by ``sample``, ``demo`` and evaluation)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from covidxray.config import Config
from covidxray.data.datasets import to_uint8
from covidxray.data.imaging import save_png
from covidxray.errors import CovidXrayError
from covidxray.infer.load import build_from_checkpoint, load_net
from covidxray.infer.protocol import Generator, LatentGenerator, Reconstructor, register_loader, require
from covidxray.models.registry import get_model


class LoadedGenerator(LatentGenerator):
    """A generator ready to sample: the network (eval mode), its config and which weights were used."""

    def __init__(self, G: nn.Module, cfg: Config, weights: str, checkpoint: dict):
        self.G, self.cfg, self.weights, self.checkpoint = G, cfg, weights, checkpoint

    @property
    def conditional(self) -> bool:
        return getattr(self.G, "n_classes", 0) > 0

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


def load_generator(checkpoint: str | os.PathLike | dict, what: str = "`sample`") -> Generator:
    """The generator of a checkpoint (file, run folder, or a checkpoint dict already read): the GANs' G (their EMA
    weights when present), a VAE's decoder, any family's :class:`~covidxray.infer.protocol.Generator`."""
    return require(checkpoint, Generator, what,
                   "A pix2pix run translates masks: pass --from-data PREPARED or --masks FOLDER; an autoencoder "
                   "reconstructs: --reconstruct FOLDER")


@register_loader("gan", LatentGenerator)
def load_gan(ckpt: dict) -> LoadedGenerator:
    """G of a GAN checkpoint, with its EMA weights when the run kept them."""
    nets, cfg = build_from_checkpoint(ckpt, "gan")
    G = nets["G"]
    weights = "G_ema" if "G_ema" in ckpt["models"] else "G"
    G.load_state_dict(ckpt["models"][weights])
    G.eval()
    return LoadedGenerator(G, cfg, weights, ckpt)


class LoadedAutoencoder(Reconstructor):
    """An autoencoder ready to reconstruct: ``net(x, y)`` -> (reconstruction, mu, logvar)."""

    def __init__(self, net: nn.Module, cfg: Config, checkpoint: dict):
        self.net, self.cfg, self.checkpoint = net, cfg, checkpoint

    def lacks(self, capability: type) -> str:
        return "it has no prior to sample from" if issubclass(capability, Generator) else ""


class LoadedVAE(LoadedGenerator, Reconstructor):
    """A VAE: its decoder generates from prior draws z ~ N(0, I) (and classes, for a cVAE); it reconstructs too."""

    def __init__(self, net: nn.Module, cfg: Config, checkpoint: dict):
        super().__init__(net.decoder, cfg, "net", checkpoint)
        self.net = net


@register_loader("autoencoder", Reconstructor, (LatentGenerator, "prior"))
def load_autoencoder(ckpt: dict) -> LoadedAutoencoder | LoadedVAE:
    """An autoencoder checkpoint's network (eval mode); a model with a prior (vae, cvae) generates too."""
    net, cfg = load_net(ckpt, "autoencoder")
    if "prior" in get_model(cfg.model.name).features:
        return LoadedVAE(net, cfg, ckpt)
    return LoadedAutoencoder(net, cfg, ckpt)


def sample_name(i: int, prefix: str = "sample") -> str:
    """The file name of image ``i`` of a ``sample`` folder."""
    return f"{prefix}_{i:05d}.png"


def write_samples(images: torch.Tensor, out: Path, prefix: str = "sample", indices=None) -> list[Path]:
    """Write each uint8 image as ``<out>/<prefix>_00000.png`` … (atomically; ``indices`` name them)."""
    indices = range(len(images)) if indices is None else indices
    return [save_png(img[0], out / sample_name(i, prefix)) for i, img in zip(indices, images)]
