"""GAN losses and regularisers as pure functions of logits and images.

Every function here is device-agnostic, loop-free over the batch and free of host
syncs (no ``.item()``), so it can sit inside a CUDA step, under
``torch.autocast(dtype=torch.bfloat16)`` and on ``channels_last`` tensors. Losses
are computed in float32 (inputs are cast with ``.float()``): a bf16 logit has
only 8 bits of mantissa, and ``softplus``/squares of such values lose the small
differences the optimiser lives on.

Contents (formulas and defaults in ``docs/training.md``):

* :func:`d_loss`, :func:`g_loss` - ``bce`` (non-saturating), ``hinge``, ``lsgan``;
* :func:`r1_penalty` - R1 gradient penalty on reals (Mescheder et al. 2018);
* :func:`aux_d_loss`, :func:`aux_g_loss` - ACGAN's auxiliary classification losses
  (Odena et al. 2017) and the TAC-GAN correction (Gong et al. 2019);
* :func:`mc_dropout_uncertainty`, :func:`uncertainty_terms` - the project's
  Monte-Carlo-dropout uncertainty regulariser;
* :func:`cutmix_masks`, :func:`cutmix`, :func:`cutmix_consistency`,
  :func:`mixed_pixel_d_loss` - CutMix for the U-Net discriminator
  (Schönfeld et al. 2020).

Example:
    >>> import torch
    >>> r, f = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    >>> float(d_loss("hinge", r, f)), float(g_loss("hinge", f))
    (1.0, 0.75)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_KINDS",
    "UNCERTAINTY_MODES",
    "d_loss",
    "g_loss",
    "r1_penalty",
    "mc_dropout_uncertainty",
    "uncertainty_terms",
    "cutmix_masks",
    "cutmix",
    "cutmix_consistency",
    "mixed_pixel_d_loss",
]

LOSS_KINDS: tuple[str, ...] = ("bce", "hinge", "lsgan")
UNCERTAINTY_MODES: tuple[str, ...] = ("off", "min", "max")


def _check_kind(kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown GAN loss kind {kind!r}; valid kinds: {', '.join(LOSS_KINDS)}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype} with shape {tuple(t.shape)}")


# --------------------------------------------------------------------------- adversarial losses


def d_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss, mean over all elements of each term.

    * ``bce`` - non-saturating GAN (Goodfellow et al. 2014, as in DCGAN):
      ``mean(softplus(-r)) + mean(softplus(f))`` (= BCE with targets 1/0).
    * ``hinge`` - Lim & Ye 2017 / Miyato et al. 2018:
      ``mean(relu(1 - r)) + mean(relu(1 + f))``.
    * ``lsgan`` - Mao et al., "Least Squares Generative Adversarial Networks", ICCV 2017,
      targets 1/0: ``0.5 * mean((r - 1)^2) + 0.5 * mean(f^2)``.

    Because each term is a mean over all of its elements, the same call serves
    per-image logits ``(N,)`` and per-pixel logits ``(N, 1, H, W)`` of a U-Net
    decoder; real and fake may even have different batch sizes.

    Args:
        kind: one of :data:`LOSS_KINDS`.
        logits_real: D's logits on real images, any shape.
        logits_fake: D's logits on generated images, any shape.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: unknown ``kind`` or non-float logits.

    Example:
        >>> float(d_loss("lsgan", torch.ones(4), torch.zeros(4)))
        0.0
    """
    _check_kind(kind)
    _check_float("logits_real", logits_real)
    _check_float("logits_fake", logits_fake)
    r, f = logits_real.float(), logits_fake.float()
    if kind == "bce":
        return F.softplus(-r).mean() + F.softplus(f).mean()
    if kind == "hinge":
        return F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean()
    return 0.5 * (r - 1.0).square().mean() + 0.5 * f.square().mean()


def g_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss, mean over all elements.

    * ``bce`` - non-saturating: ``mean(softplus(-f))`` (G maximises log D(G(z))).
    * ``hinge`` - ``-mean(f)`` (Lim & Ye 2017; Miyato et al. 2018).
    * ``lsgan`` - ``0.5 * mean((f - 1)^2)`` (Mao et al. 2017, target 1).

    Args:
        kind: one of :data:`LOSS_KINDS`.
        logits_fake: D's logits on generated images, ``(N,)`` or ``(N, 1, H, W)``.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: unknown ``kind`` or non-float logits.

    Example:
        >>> round(float(g_loss("bce", torch.zeros(3))), 4)  # ln 2
        0.6931
    """
    _check_kind(kind)
    _check_float("logits_fake", logits_fake)
    f = logits_fake.float()
    if kind == "bce":
        return F.softplus(-f).mean()
    if kind == "hinge":
        return -f.mean()
    return 0.5 * (f - 1.0).square().mean()


# --------------------------------------------------------------------------- ACGAN / TAC-GAN


AUX_MODES = ("acgan", "real", "tac")


def aux_d_loss(mode: str, class_real: torch.Tensor, labels: torch.Tensor, class_fake: torch.Tensor | None = None,
               twin_fake: torch.Tensor | None = None) -> torch.Tensor:
    """D's auxiliary classification loss (unweighted), class logits (N, C) and labels (N,).

    * ``acgan`` (Odena et al. 2017, the paper's L_C): ``CE(C(x), y) + CE(C(G(z, y)), y)``;
    * ``real``: ``CE(C(x), y)`` - the classifier never learns the fakes;
    * ``tac`` (Gong et al., "Twin Auxiliary Classifiers GAN", NeurIPS 2019):
      ``CE(C(x), y) + CE(C_twin(G(z, y)), y)`` - the twin classifier learns the fakes instead.
    """
    if mode not in AUX_MODES:
        raise ValueError(f"unknown aux mode {mode!r}; expected one of {', '.join(AUX_MODES)}")
    loss = F.cross_entropy(class_real.float(), labels)
    if mode == "acgan":
        if class_fake is None:
            raise ValueError("aux mode 'acgan' needs the class logits of the fakes")
        loss = loss + F.cross_entropy(class_fake.float(), labels)
    elif mode == "tac":
        if twin_fake is None:
            raise ValueError("aux mode 'tac' needs the twin classifier's logits of the fakes")
        loss = loss + F.cross_entropy(twin_fake.float(), labels)
    return loss


def aux_g_loss(class_fake: torch.Tensor, labels: torch.Tensor, twin_fake: torch.Tensor | None = None) -> torch.Tensor:
    """G's auxiliary loss (unweighted): ``CE(C(G(z, y)), y)``, minus ``CE(C_twin(G(z, y)), y)`` with a twin
    classifier (TAC-GAN). The difference estimates the KL divergence between the real and generated
    class-conditional distributions; without it G is rewarded for the easiest-to-classify image of a class,
    the known collapse of ACGAN (Gong et al. 2019, Sec. 3)."""
    loss = F.cross_entropy(class_fake.float(), labels)
    if twin_fake is not None:
        loss = loss - F.cross_entropy(twin_fake.float(), labels)
    return loss


# --------------------------------------------------------------------------- R1


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty on real data (Mescheder, Geiger, Nowozin, "Which Training
    Methods for GANs do actually Converge?", ICML 2018).

    ``R1 = mean_i ||grad_x D(x_i)||^2``, the squared norm summed over the pixels
    of each image and averaged over the batch. The gradient is taken of
    ``real_logits.sum()`` with ``create_graph=True`` so that the penalty itself can
    be back-propagated into D. Summing makes per-image logits ``(N,)`` and
    per-pixel logits ``(N, 1, H, W)`` (U-Net decoder: the gradient of the sum of an
    image's pixel logits) both work; samples are independent in D (no BatchNorm
    across the batch in train mode, or the penalty mixes samples).

    The caller scales it. With lazy regularisation (Karras et al., StyleGAN2,
    CVPR 2020) the penalty is evaluated only every ``k = loss.r1_every`` D steps
    and its weight multiplied by ``k`` so that its expected contribution is
    unchanged::

        if step % k == 0:
            loss_D += (gamma / 2) * k * r1_penalty(D(x_real), x_real)

    Args:
        real_logits: D's logits on ``real_images``; ``(N,)``, ``(N, 1)`` or ``(N, 1, H, W)``.
        real_images: the real batch ``(N, C, H, W)`` with ``requires_grad=True``
            set *before* it went through D.

    Returns:
        A float32 scalar, differentiable w.r.t. D's parameters.

    Raises:
        ValueError: ``real_images`` does not require grad, or the batch sizes differ.

    Example:
        >>> x = torch.randn(2, 1, 4, 4, requires_grad=True)
        >>> w = torch.randn(1, 1, 4, 4)
        >>> torch.allclose(r1_penalty((w * x).sum((1, 2, 3)), x), w.square().sum())
        True
    """
    if not real_images.requires_grad:
        raise ValueError(
            f"real_images {tuple(real_images.shape)} must have requires_grad=True before the D forward pass "
            "(call real_images.requires_grad_(True))"
        )
    if real_logits.ndim == 0 or real_logits.shape[0] != real_images.shape[0]:
        raise ValueError(
            f"real_logits {tuple(real_logits.shape)} and real_images {tuple(real_images.shape)} "
            "must share the batch dimension"
        )
    # Summing in float32: a bf16 sum of many pixel logits would round before the backward pass.
    (grad,) = torch.autograd.grad(outputs=real_logits.float().sum(), inputs=real_images, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()


# --------------------------------------------------------------------------- MC-dropout uncertainty


def mc_dropout_uncertainty(logits_k: torch.Tensor) -> torch.Tensor:
    """Discriminator uncertainty from K Monte-Carlo dropout passes (Gal & Ghahramani,
    "Dropout as a Bayesian Approximation", ICML 2016).

    ``U = mean_n Var_k sigmoid(logits[k, n])`` with the population variance
    (``correction=0``): the spread of D's probability "real" across dropout masks.

    The project's uncertainty regulariser, with ``lambda = loss.uncertainty_weight``
    and ``U_fake = mc_dropout_uncertainty(D_K(G(z)))`` (see :func:`uncertainty_terms`):

    * ``min``: ``L_G += lambda * U_fake`` and ``L_D -= lambda * U_fake`` - G makes D
      confident on its fakes, D keeps its own uncertainty on fakes high;
    * ``max``: the opposite signs;
    * ``off``: nothing.

    Args:
        logits_k: ``(K, N)`` logits of K >= 2 stochastic passes over N images.

    Returns:
        A float32 scalar in ``[0, 0.25]``.

    Raises:
        ValueError: not 2-D, or K < 2 (a variance over one pass is always 0, which
            would silently switch the regulariser off).

    Example:
        >>> p = torch.tensor([[0.2, 0.5], [0.4, 0.5]])
        >>> round(float(mc_dropout_uncertainty(torch.logit(p))), 6)
        0.005
    """
    if logits_k.ndim != 2:
        raise ValueError(f"logits_k must have shape (K, N) (K dropout passes), got {tuple(logits_k.shape)}")
    if logits_k.shape[0] < 2:
        raise ValueError(f"need K >= 2 Monte-Carlo passes to estimate a variance, got logits_k {tuple(logits_k.shape)}")
    _check_float("logits_k", logits_k)
    return torch.sigmoid(logits_k.float()).var(dim=0, correction=0).mean()


def uncertainty_terms(mode: str, u: torch.Tensor, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed uncertainty terms to add to D's and G's losses.

    ``min`` -> ``(-w*u, +w*u)``; ``max`` -> ``(+w*u, -w*u)``; ``off`` -> two zeros
    (on ``u``'s device, not connected to the graph). See
    :func:`mc_dropout_uncertainty` for the regulariser.

    Evaluate ``u`` in each step with the graph that step needs: in the D step on
    ``D_K(G(z).detach())`` (gradients reach D only), in the G step on
    ``D_K(G(z))`` with only G's optimiser stepping.

    Args:
        mode: one of :data:`UNCERTAINTY_MODES`.
        u: the uncertainty scalar from :func:`mc_dropout_uncertainty`.
        weight: ``lambda`` (``loss.uncertainty_weight``); 1.0 returns the bare signed ``u``.

    Returns:
        ``(term_for_D, term_for_G)``.

    Raises:
        ValueError: unknown ``mode``.

    Example:
        >>> d, g = uncertainty_terms("min", torch.tensor(0.5))
        >>> float(d), float(g)
        (-0.5, 0.5)
    """
    if mode not in UNCERTAINTY_MODES:
        raise ValueError(f"unknown uncertainty mode {mode!r}; valid modes: {', '.join(UNCERTAINTY_MODES)}")
    if mode == "off":
        zero = torch.zeros((), device=u.device, dtype=u.dtype)
        return zero, zero.clone()
    term = weight * u
    return (-term, term) if mode == "min" else (term, -term)


# --------------------------------------------------------------------------- CutMix (U-Net GAN)


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
    _check_kind(kind)
    _check_float("pixel_logits_mixed", pixel_logits_mixed)
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
