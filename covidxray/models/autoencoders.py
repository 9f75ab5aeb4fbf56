"""Convolutional autoencoders: a plain ``autoencoder``, a ``vae`` (Kingma & Welling 2014; beta-VAE, Higgins et
al. 2017) and its class-conditional form ``cvae`` (Sohn, Lee & Yan 2015).

Encoder: stride-2 4x4 convolutions from the input side down to 4 x 4 (``arch.channels`` doubling per level up
to ``arch.max_channels``; BatchNorm after the first; LeakyReLU 0.2), then a linear layer to the code
(``arch.latent_dim``; a VAE gives a mean and a log-variance). Decoder: the mirror image (a linear layer to
4 x 4, stride-2 4x4 transposed convolutions, BatchNorm, ReLU) ending in tanh, so images are in [-1, 1] like
the GANs'. The ``cvae`` gives the class to both halves: one-hot maps beside the image for the encoder, a
one-hot vector beside z for the decoder.

The decoder has the GAN generator's interface (``decoder(z, y)`` with ``latent_dim``, ``n_classes`` and
``image_size``), so a VAE samples from its prior through ``covidxray sample`` and is scored by ``evaluate``
like a GAN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from covidxray.metrics.image import reparameterize
from covidxray.models.registry import register_model

PAPER_AE = "Hinton & Salakhutdinov, Reducing the Dimensionality of Data with Neural Networks, Science 2006"
PAPER_VAE = ("Kingma & Welling, Auto-Encoding Variational Bayes, ICLR 2014; beta-VAE: Higgins et al., ICLR 2017")
PAPER_CVAE = "Sohn, Lee & Yan, Learning Structured Output Representation using Deep Conditional Generative Models, NeurIPS 2015"


def _widths(image_size: int, channels: int, max_channels: int) -> list[int]:
    levels = int(math.log2(image_size // 4))
    return [min(channels * 2 ** i, max_channels) for i in range(levels)]


class Encoder(nn.Module):
    """Image (N x 1 x S x S, plus one-hot class maps when conditional) -> a vector of ``out_dim``."""

    def __init__(self, image_size: int, channels: int, max_channels: int, out_dim: int, n_classes: int = 0):
        super().__init__()
        widths = _widths(image_size, channels, max_channels)
        layers, c_in = [], 1 + n_classes
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 4, 2, 1, bias=i == 0)]
            if i > 0:
                layers += [nn.BatchNorm2d(c)]
            layers += [nn.LeakyReLU(0.2, inplace=True)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * 16, out_dim)
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.n_classes:
            maps = F.one_hot(y, self.n_classes).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
            x = torch.cat([x, maps], 1)
        return self.fc(self.conv(x).flatten(1))


class Decoder(nn.Module):
    """Code z (N x latent_dim, plus the class when conditional) -> image N x 1 x S x S in [-1, 1]."""

    def __init__(self, image_size: int, channels: int, max_channels: int, latent_dim: int, n_classes: int = 0):
        super().__init__()
        widths = _widths(image_size, channels, max_channels)[::-1]
        self.latent_dim, self.n_classes, self.image_size = latent_dim, n_classes, image_size
        self.top = widths[0]
        self.fc = nn.Linear(latent_dim + n_classes, widths[0] * 16)
        layers = [nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(widths[-1], 1, 4, 2, 1), nn.Tanh()]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.n_classes:
            z = torch.cat([z, F.one_hot(y, self.n_classes).to(z.dtype)], 1)
        return self.deconv(self.fc(z).view(z.shape[0], self.top, 4, 4))


class AutoEncoder(nn.Module):
    """Encoder + decoder; ``variational=True`` makes it a VAE (module docstring).

    ``forward(x, y=None, eps=None)`` returns ``(reconstruction, mu, logvar)``: for a plain autoencoder mu is the
    code and logvar None; for a VAE the decoder gets ``mu + sigma * eps`` when ``eps`` (standard normal, N x
    latent_dim) is given (training), else mu (a deterministic reconstruction).

    Example:
        >>> net = AutoEncoder(64, channels=8, latent_dim=16, variational=True)
        >>> recon, mu, logvar = net(torch.zeros(2, 1, 64, 64), eps=torch.randn(2, 16))
        >>> recon.shape, mu.shape
        (torch.Size([2, 1, 64, 64]), torch.Size([2, 16]))
    """

    def __init__(self, image_size: int, channels: int = 32, max_channels: int = 256, latent_dim: int = 128,
                 variational: bool = False, n_classes: int = 0):
        super().__init__()
        if image_size < 16 or image_size & (image_size - 1):
            raise ValueError(f"the image side must be a power of two >= 16, got {image_size}")
        self.variational, self.latent_dim, self.n_classes = variational, latent_dim, n_classes
        self.image_size = image_size
        out = 2 * latent_dim if variational else latent_dim
        self.encoder = Encoder(image_size, channels, max_channels, out, n_classes)
        self.decoder = Decoder(image_size, channels, max_channels, latent_dim, n_classes)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.encoder(x, y)
        if self.variational:
            mu, logvar = h.chunk(2, dim=1)
            return mu, logvar.clamp(-30.0, 20.0)
        return h, None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, eps: torch.Tensor | None = None):
        mu, logvar = self.encode(x, y)
        z = reparameterize(mu, logvar, eps.to(mu.dtype)) if (self.variational and eps is not None) else mu
        return self.decoder(z, y), mu, logvar


def _build(cfg, data, variational: bool, conditional: bool) -> dict[str, nn.Module]:
    a = cfg.arch
    k = data.n_classes if conditional else 0
    return {"net": AutoEncoder(data.image_size, a.channels, a.max_channels, a.latent_dim, variational, k)}


@register_model("autoencoder", family="autoencoder", paper=PAPER_AE,
                summary="convolutional autoencoder (reconstructions; no prior to sample from)", min_image_size=32)
def build_autoencoder(cfg, data):
    """Convolutional autoencoder: 4x4 stride-2 encoder to a 128-d code, mirrored decoder, tanh output; MSE loss
    (``configs/autoencoder.yaml``, ``docs/autoencoders.md``)."""
    return _build(cfg, data, variational=False, conditional=False)


@register_model("vae", family="autoencoder", paper=PAPER_VAE, features=("prior",),
                summary="variational autoencoder (beta and KL warm-up configurable); samples from its prior",
                min_image_size=32)
def build_vae(cfg, data):
    """VAE (Kingma & Welling 2014): the autoencoder with a Gaussian code (mean, log-variance), the KL term weighted
    by ``loss.beta`` (beta-VAE) with a linear warm-up (``configs/vae.yaml``, ``docs/autoencoders.md``)."""
    return _build(cfg, data, variational=True, conditional=False)


@register_model("cvae", family="autoencoder", paper=PAPER_CVAE, conditional=True, features=("prior",),
                summary="class-conditional VAE: samples per class from its prior (downstream experiments)",
                min_image_size=32)
def build_cvae(cfg, data):
    """Conditional VAE (Sohn et al. 2015): the VAE with the class given to encoder (one-hot maps) and decoder
    (one-hot beside z) (``configs/cvae.yaml``, ``docs/autoencoders.md``)."""
    return _build(cfg, data, variational=True, conditional=True)
