"""CutMix regularisation of the U-Net GAN discriminator, as pure functions (U-Net GAN only).

Schönfeld, Schiele, Khoreva, "A U-Net Based Discriminator for Generative Adversarial Networks",
CVPR 2020: the encoder head must call a real/fake mix fake, the decoder head must tell per pixel
where the mix came from, and its per-pixel decisions on the mix must equal the mix of its decisions
on the two sources (the consistency term). Formulas and defaults: ``docs/training.md``.

* :func:`cutmix_masks` - random boxes, 1 = pixel from the real image;
* :func:`cutmix` - mix reals and fakes with those masks;
* :func:`cutmix_consistency` - the consistency regulariser;
* :func:`mixed_pixel_d_loss` - the decoder's per-pixel loss on mixed images.

Like :mod:`covidxray.train.gan_losses`: device-agnostic, no host syncs, float32 arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from covidxray.train.gan_losses import check_float, check_kind

__all__ = ["cutmix_masks", "cutmix", "cutmix_consistency", "mixed_pixel_d_loss"]

def _resolve_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator lives on {generator.device} but the tensors are on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )
    return device


def cutmix_masks(
    n: int,
    h: int,
    w: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random CutMix masks for the U-Net discriminator (Schönfeld, Schiele, Khoreva,
    "A U-Net Based Discriminator for Generative Adversarial Networks", CVPR 2020).

    Per image, as in CutMix (Yun et al., ICCV 2019): draw ``lam ~ U(0, 1)``, cut a
    box of sides ``round(h * sqrt(1 - lam))`` x ``round(w * sqrt(1 - lam))`` (area
    ratio ~ ``1 - lam``, i.e. uniform) at a uniform position that keeps it inside
    the image (no clipping, so the area distribution stays uniform). The box is 1
    (pixels from the REAL image) and the rest 0, then the whole mask is inverted with
    probability 0.5, so both real-in-fake and fake-in-real mixes occur.

    All randomness comes from one ``torch.rand`` draw of ``(n, 4)`` numbers from
    ``generator`` (which must live on ``device``), so a saved generator state
    resumes exactly.

    Args:
        n: batch size.
        h: mask height.
        w: mask width.
        generator: optional ``torch.Generator`` on ``device``; None uses the global RNG.
        device: where to create the masks; defaults to the generator's device, else CPU.

    Returns:
        ``(n, 1, h, w)`` float32 tensor of 0s and 1s.

    Raises:
        ValueError: non-positive sizes, or generator and device disagree.

    Example:
        >>> m = cutmix_masks(4, 8, 8, generator=torch.Generator().manual_seed(0))
        >>> m.shape, bool(((m == 0) | (m == 1)).all())
        (torch.Size([4, 1, 8, 8]), True)
    """
    if n < 1 or h < 1 or w < 1:
        raise ValueError(f"cutmix_masks needs positive sizes, got n={n}, h={h}, w={w}")
    device = _resolve_device(generator, device)
    u = torch.rand(n, 4, generator=generator, device=device)
    ratio = torch.sqrt(1.0 - u[:, 0])                       # side ratio; area ratio = 1 - lam ~ U(0, 1)
    cut_h = torch.round(h * ratio).long()
    cut_w = torch.round(w * ratio).long()
    # Top-left corner uniform over the positions that keep the box inside the image.
    y0 = torch.minimum((u[:, 1] * (h - cut_h + 1)).long(), h - cut_h)
    x0 = torch.minimum((u[:, 2] * (w - cut_w + 1)).long(), w - cut_w)
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_y = (rows >= y0[:, None]) & (rows < (y0 + cut_h)[:, None])   # (n, h)
    in_x = (cols >= x0[:, None]) & (cols < (x0 + cut_w)[:, None])   # (n, w)
    box = in_y[:, :, None] & in_x[:, None, :]                        # (n, h, w)
    invert = (u[:, 3] < 0.5)[:, None, None]
    return (box ^ invert).unsqueeze(1).float()


def _check_mask(mask: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if mask.ndim != 4 or mask.shape[0] != like.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != like.shape[2:]:
        raise ValueError(
            f"mask must have shape (N, 1, H, W) matching {like_name} {tuple(like.shape)}, got {tuple(mask.shape)}"
        )


def cutmix(real: torch.Tensor, fake: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mix two batches: ``mask * real + (1 - mask) * fake`` (Schönfeld et al. 2020).

    Differentiable w.r.t. ``real`` and ``fake``. Also used on D's pixel logits to
    build the consistency target (:func:`cutmix_consistency`).

    Args:
        real: ``(N, C, H, W)``.
        fake: same shape as ``real``.
        mask: ``(N, 1, H, W)``, 1 where the pixel comes from ``real`` (from :func:`cutmix_masks`).

    Returns:
        ``(N, C, H, W)`` in ``real``'s dtype.

    Raises:
        ValueError: shapes disagree.

    Example:
        >>> r, f = torch.ones(1, 1, 2, 2), -torch.ones(1, 1, 2, 2)
        >>> cutmix(r, f, torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])).flatten().tolist()
        [1.0, -1.0, -1.0, 1.0]
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} must have the same shape")
    _check_mask(mask, real, "real")
    m = mask.to(real.dtype)  # a float32 mask would promote bf16 images to float32
    return m * real + (1.0 - m) * fake


def cutmix_consistency(
    pixel_logits_mixed: torch.Tensor,
    pixel_logits_real: torch.Tensor,
    pixel_logits_fake: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """CutMix consistency regulariser of the U-Net discriminator (Schönfeld et al. 2020, Eq. 6).

    ``mean((D_dec(mix(x, G(z), M)) - mix(D_dec(x), D_dec(G(z)), M))^2)``: the
    decoder's per-pixel decision on a mixed image should equal the mix of its
    decisions on the two sources. It is zero for any purely pixel-wise decoder and
    penalises decisions that leak across the cut boundary.

    Nothing is detached here: the paper adds this term (times
    ``loss.consistency_weight``) to D's loss in D's update, where the fakes are
    already ``G(z).detach()``; gradients flow through all three logits into D.

    Args:
        pixel_logits_mixed: decoder logits on ``cutmix(real, fake, mask)``, ``(N, 1, H, W)``.
        pixel_logits_real: decoder logits on the real batch, same shape.
        pixel_logits_fake: decoder logits on the fake batch, same shape.
        mask: the mask used for mixing, ``(N, 1, H, W)``.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: shapes disagree.

    Example:
        >>> r, f = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
        >>> m = cutmix_masks(2, 4, 4)
        >>> float(cutmix_consistency(cutmix(r, f, m), r, f, m))  # identity decoder
        0.0
    """
    shapes = {tuple(t.shape) for t in (pixel_logits_mixed, pixel_logits_real, pixel_logits_fake)}
    if len(shapes) != 1:
        raise ValueError(
            "pixel logits must share one shape, got mixed "
            f"{tuple(pixel_logits_mixed.shape)}, real {tuple(pixel_logits_real.shape)}, "
            f"fake {tuple(pixel_logits_fake.shape)}"
        )
    _check_mask(mask, pixel_logits_mixed, "pixel_logits_mixed")
    target = cutmix(pixel_logits_real.float(), pixel_logits_fake.float(), mask)
    return (pixel_logits_mixed.float() - target).square().mean()


def mixed_pixel_d_loss(kind: str, pixel_logits_mixed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """D's decoder loss on a CutMix image: per-pixel targets given by the mask
    (Schönfeld et al. 2020, Sec. 3.2; the encoder's target for a mixed image is "fake").

    Per pixel, the :func:`d_loss` term for "real" where ``mask == 1`` and for
    "fake" where ``mask == 0``, averaged over all pixels: ``bce``
    ``M*softplus(-l) + (1-M)*softplus(l)``; ``hinge`` ``M*relu(1-l) + (1-M)*relu(1+l)``;
    ``lsgan`` ``0.5*(l - M)^2``.

    Args:
        kind: one of :data:`LOSS_KINDS`.
        pixel_logits_mixed: decoder logits on the mixed batch, ``(N, 1, H, W)``.
        mask: the CutMix mask, ``(N, 1, H, W)``.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: unknown ``kind`` or shapes disagree.

    Example:
        >>> float(mixed_pixel_d_loss("lsgan", torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2)))
        0.0
    """
    check_kind(kind)
    check_float("pixel_logits_mixed", pixel_logits_mixed)
    if pixel_logits_mixed.shape != mask.shape:
        raise ValueError(
            f"pixel_logits_mixed {tuple(pixel_logits_mixed.shape)} and mask {tuple(mask.shape)} must have the same shape"
        )
    logit, m = pixel_logits_mixed.float(), mask.float()
    if kind == "bce":
        per_pixel = m * F.softplus(-logit) + (1.0 - m) * F.softplus(logit)
    elif kind == "hinge":
        per_pixel = m * F.relu(1.0 - logit) + (1.0 - m) * F.relu(1.0 + logit)
    else:
        per_pixel = 0.5 * (logit - m).square()
    return per_pixel.mean()
