"""GAN-only losses and regularisers as pure functions of logits and images.

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
  Monte-Carlo-dropout uncertainty regulariser.

CutMix for the U-Net discriminator lives in :mod:`covidxray.train.unetgan_cutmix`.

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
]

LOSS_KINDS: tuple[str, ...] = ("bce", "hinge", "lsgan")
UNCERTAINTY_MODES: tuple[str, ...] = ("off", "min", "max")


def check_kind(kind: str) -> None:
    """Refuse a GAN loss kind that is not one of :data:`LOSS_KINDS` (also used by the U-Net GAN's CutMix loss)."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown GAN loss kind {kind!r}; valid kinds: {', '.join(LOSS_KINDS)}")


def check_float(name: str, t: torch.Tensor) -> None:
    """Refuse logits that are not floating point, naming them with their dtype and shape."""
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
    check_kind(kind)
    check_float("logits_real", logits_real)
    check_float("logits_fake", logits_fake)
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
    check_kind(kind)
    check_float("logits_fake", logits_fake)
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
    check_float("logits_k", logits_k)
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
