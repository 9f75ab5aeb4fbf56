"""What every GAN in the registry shares: the discriminator's output type and small helpers.

Interface of the networks the training loop relies on:

* ``G(z, y=None) -> images`` (N x 1 x S x S in [-1, 1]); attributes ``latent_dim``
  and ``n_classes`` (0 for unconditional models, which ignore ``y``).
* ``D(x, y=None, mc_samples=1) -> DOutput``; ``n_classes`` likewise. With
  ``mc_samples=K > 1`` a model that supports Monte-Carlo dropout returns
  ``logits`` of shape (K, N): K stochastic passes of its dropout head over one
  pass of its trunk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DOutput:
    """What a discriminator returns.

    Attributes:
        logits: real/fake logit per image, (N,) - or (K, N) for K Monte-Carlo dropout passes.
        class_logits: class logits per image (N, C) for auxiliary-classifier models, else None.
        pixel_logits: real/fake logit per pixel (N, 1, H, W) for U-Net discriminators, else None.
        twin_logits: class logits of TAC-GAN's twin classifier (N, C), else None.
    """

    logits: torch.Tensor
    class_logits: torch.Tensor | None = None
    pixel_logits: torch.Tensor | None = None
    twin_logits: torch.Tensor | None = None

    def mc_split(self) -> tuple[torch.Tensor, "DOutput"]:
        """For Monte-Carlo logits (K, N): those logits, and this output with the first of the K
        dropout passes as its ordinary ``logits`` (N,) (the other fields already come from that pass)."""
        if self.logits.ndim != 2:
            raise ValueError(f"mc_split() needs Monte-Carlo logits (K, N), got shape {tuple(self.logits.shape)}")
        return self.logits, dataclasses.replace(self, logits=self.logits[0])

    def split(self, n: int) -> tuple["DOutput", "DOutput"]:
        """Split the output of one pass over ``cat([a, b])`` (a of ``n`` images) into a's and b's.

        Only for single passes (``logits`` of shape (N,)), and only meaningful for a discriminator
        whose images do not see each other (no BatchNorm in train mode)."""
        if self.logits.ndim != 1:
            raise ValueError(f"split() needs per-image logits (N,), got shape {tuple(self.logits.shape)}")
        fields = ("logits", "class_logits", "pixel_logits", "twin_logits")
        parts = [(None, None) if getattr(self, f) is None else (getattr(self, f)[:n], getattr(self, f)[n:])
                 for f in fields]
        return DOutput(*(a for a, _ in parts)), DOutput(*(b for _, b in parts))


def maybe_sn(module: nn.Module, enabled: bool) -> nn.Module:
    """Wrap a conv/linear layer in spectral normalisation (Miyato et al. 2018) when enabled."""
    return nn.utils.parametrizations.spectral_norm(module) if enabled else module


def check_labels(y: torch.Tensor | None, n: int, n_classes: int) -> torch.Tensor:
    """Validate class labels of a conditional model (clear ValueError with the shapes)."""
    if y is None:
        raise ValueError(f"this model is class-conditional ({n_classes} classes): pass labels y of shape ({n},)")
    if y.shape != (n,):
        raise ValueError(f"labels y must have shape ({n},), got {tuple(y.shape)}")
    return y
