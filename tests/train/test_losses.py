"""Known-answer tests of the GAN losses and regularisers (covidxray.train.gan_losses) and the U-Net GAN's
CutMix (covidxray.train.unetgan_cutmix)."""

import math

import pytest
import torch
import torch.nn.functional as F

from covidxray.train import gan_losses as losses
from covidxray.train.gan_losses import (
    LOSS_KINDS,
    UNCERTAINTY_MODES,
    d_loss,
    g_loss,
    mc_dropout_uncertainty,
    r1_penalty,
    uncertainty_terms,
)
from covidxray.train.unetgan_cutmix import cutmix, cutmix_consistency, cutmix_masks, mixed_pixel_d_loss


def test_hinge_known_values():
    r, f = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # D: mean(relu(1-r)) + mean(relu(1+f)) = (0 + 0.5)/2 + (0 + 1.5)/2
    assert d_loss("hinge", r, f).item() == pytest.approx(1.0)
    assert g_loss("hinge", f).item() == pytest.approx(0.75)  # -mean(f) = -(-2 + 0.5)/2


def test_bce_at_zero_logits():
    z = torch.zeros(5)
    assert d_loss("bce", z, z).item() == pytest.approx(2 * math.log(2))
    assert g_loss("bce", z).item() == pytest.approx(math.log(2))


def test_bce_matches_binary_cross_entropy():
    r, f = torch.randn(7), torch.randn(7)
    ref = (F.binary_cross_entropy_with_logits(r, torch.ones(7))
           + F.binary_cross_entropy_with_logits(f, torch.zeros(7)))
    assert d_loss("bce", r, f).item() == pytest.approx(ref.item(), rel=1e-6)


def test_lsgan_known_values():
    assert d_loss("lsgan", torch.ones(3), torch.zeros(3)).item() == 0.0
    assert g_loss("lsgan", torch.zeros(3)).item() == pytest.approx(0.5)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_per_pixel_logits_and_float32_output(kind):
    r = torch.randn(4, 1, 8, 8, dtype=torch.bfloat16)
    f = torch.randn(4, 1, 8, 8, dtype=torch.bfloat16)
    ld, lg = d_loss(kind, r, f), g_loss(kind, f)
    assert ld.shape == () and lg.shape == ()
    assert ld.dtype == torch.float32 and lg.dtype == torch.float32
    # A constant per-pixel map gives the same loss as the per-image logit.
    c = torch.full((2, 1, 4, 4), 0.3)
    assert d_loss(kind, c, -c).item() == pytest.approx(d_loss(kind, c[:, 0, 0, 0], -c[:, 0, 0, 0]).item())


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="bce, hinge, lsgan"):
        d_loss("wgan", torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="valid kinds"):
        g_loss("wgan", torch.zeros(1))


def test_r1_linear_discriminator_is_norm_of_weights():
    w = torch.randn(1, 1, 6, 6)
    x = torch.randn(3, 1, 6, 6, requires_grad=True)
    logits = (w * x).sum(dim=(1, 2, 3))  # D(x) = <w, x>, grad = w for every image
    assert r1_penalty(logits, x).item() == pytest.approx(w.square().sum().item(), rel=1e-6)


def test_r1_quadratic_discriminator_and_create_graph():
    x = torch.randn(4, 1, 5, 5, requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    logits = scale * 0.5 * x.square().sum(dim=(1, 2, 3))  # grad = scale * x
    r1 = r1_penalty(logits, x)
    assert r1.item() == pytest.approx(x.detach().square().sum(dim=(1, 2, 3)).mean().item(), rel=1e-6)
    r1.backward()  # create_graph=True: the penalty is differentiable w.r.t. D's parameters
    assert scale.grad is not None and scale.grad.item() == pytest.approx(2 * r1.item(), rel=1e-5)


def test_r1_per_pixel_logits():
    w = torch.randn(1, 1, 4, 4)
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    assert r1_penalty(w * x, x).item() == pytest.approx(w.square().sum().item(), rel=1e-6)


def test_r1_errors():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(x.sum((1, 2, 3)), x)
    x.requires_grad_(True)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        r1_penalty(torch.zeros(3), x)


def test_mc_dropout_uncertainty_known_value():
    p = torch.tensor([[0.2, 0.5], [0.4, 0.5]])  # K=2 passes, N=2 images
    # Var over K: image 0 -> mean 0.3, var 0.01; image 1 -> 0. Mean over N = 0.005.
    assert mc_dropout_uncertainty(torch.logit(p)).item() == pytest.approx(0.005, abs=1e-7)


def test_mc_dropout_uncertainty_errors():
    with pytest.raises(ValueError, match=r"\(K, N\)"):
        mc_dropout_uncertainty(torch.zeros(4))
    with pytest.raises(ValueError, match="K >= 2"):
        mc_dropout_uncertainty(torch.zeros(1, 4))


def test_uncertainty_terms_signs():
    u = torch.tensor(0.2)
    d, g = uncertainty_terms("min", u)
    assert (d.item(), g.item()) == pytest.approx((-0.2, 0.2))
    d, g = uncertainty_terms("max", u, weight=0.5)
    assert (d.item(), g.item()) == pytest.approx((0.1, -0.1))
    d, g = uncertainty_terms("off", u)
    assert d.item() == 0.0 and g.item() == 0.0 and not d.requires_grad
    assert UNCERTAINTY_MODES == ("off", "min", "max")
    with pytest.raises(ValueError, match="off, min, max"):
        uncertainty_terms("both", u)


def test_cutmix_masks_binary_shape_variety_and_orientation():
    g = torch.Generator().manual_seed(0)
    m = cutmix_masks(400, 16, 12, generator=g)
    assert m.shape == (400, 1, 16, 12) and m.dtype == torch.float32
    assert ((m == 0) | (m == 1)).all()
    frac = m.mean(dim=(1, 2, 3))
    assert frac.std() > 0.2  # area ~ U(0, 1): std ~ 0.29
    # Orientation: a box of 1s (real-in-fake) has its 1s in one rectangle; the inverse has the 0s there.
    ones_box = zeros_box = 0
    for mi in m[:, 0]:
        if 0 < mi.sum() < mi.numel():
            for val in (1.0, 0.0):
                rows, cols = torch.nonzero(mi == val, as_tuple=True)
                h = rows.max() - rows.min() + 1
                w = cols.max() - cols.min() + 1
                if h * w == len(rows) and (h < 16 or w < 12):
                    ones_box += val == 1.0
                    zeros_box += val == 0.0
                    break
    assert ones_box > 50 and zeros_box > 50


def test_cutmix_masks_deterministic_with_generator():
    a = cutmix_masks(8, 10, 10, generator=torch.Generator().manual_seed(3))
    b = cutmix_masks(8, 10, 10, generator=torch.Generator().manual_seed(3))
    c = cutmix_masks(8, 10, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cutmix_picks_pixels():
    real = torch.arange(16.0).reshape(1, 1, 4, 4)
    fake = -real - 100
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 0:2] = 1
    mixed = cutmix(real, fake, mask)
    assert torch.equal(mixed[mask.bool()], real[mask.bool()])
    assert torch.equal(mixed[~mask.bool()], fake[~mask.bool()])
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 4\)"):
        cutmix(real, fake, torch.zeros(1, 1, 3, 3))


def test_cutmix_consistency_zero_for_pixelwise_and_positive_for_blur():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(6, 1, 16, 16, generator=g), torch.randn(6, 1, 16, 16, generator=g)
    mask = cutmix_masks(6, 16, 16, generator=g)
    mixed = cutmix(real, fake, mask)

    def pixelwise(x):
        return 2.0 * x - 0.3

    assert cutmix_consistency(pixelwise(mixed), pixelwise(real), pixelwise(fake), mask).item() == pytest.approx(0.0, abs=1e-12)

    def blur(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1)

    assert cutmix_consistency(blur(mixed), blur(real), blur(fake), mask).item() > 1e-3
    with pytest.raises(ValueError, match="one shape"):
        cutmix_consistency(mixed, real[:2], fake, mask)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_mixed_pixel_d_loss_matches_d_loss_on_pure_masks(kind):
    logits = torch.randn(3, 1, 4, 4)
    ones, zeros = torch.ones_like(logits), torch.zeros_like(logits)
    # All-real mask -> the "real" term of d_loss; all-fake -> the "fake" term.
    assert mixed_pixel_d_loss(kind, logits, ones).item() == pytest.approx(
        d_loss(kind, logits, torch.full((1,), -1e4 if kind != "lsgan" else 0.0)).item(), rel=1e-5)
    assert mixed_pixel_d_loss(kind, logits, zeros).item() == pytest.approx(
        d_loss(kind, torch.full((1,), 1e4 if kind != "lsgan" else 1.0), logits).item(), rel=1e-5)


def test_losses_under_bf16_autocast_and_channels_last():
    x = torch.randn(4, 1, 8, 8).to(memory_format=torch.channels_last).requires_grad_(True)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pix = conv(x)
        assert pix.dtype == torch.bfloat16
        loss = d_loss("hinge", pix, -pix) + r1_penalty(pix, x)
        mask = cutmix_masks(4, 8, 8)
        cons = cutmix_consistency(conv(cutmix(x, -x, mask)), pix, conv(-x), mask)
    assert loss.dtype == torch.float32 and cons.dtype == torch.float32
    (loss + cons).backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_bf16_channels_last_without_host_syncs():
    dev = torch.device("cuda")
    conv = torch.nn.Conv2d(1, 1, 3, padding=1).to(dev, memory_format=torch.channels_last)
    x = torch.randn(8, 1, 16, 16, device=dev).to(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.Generator(device=dev).manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")  # any .item()/host sync inside raises
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pix = conv(x)
            losses = [d_loss(k, pix, -pix) + g_loss(k, pix) for k in LOSS_KINDS]
            r1 = r1_penalty(pix, x)
            mask = cutmix_masks(8, 16, 16, generator=g)
            mixed = cutmix(x, -x, mask)
            cons = cutmix_consistency(conv(mixed), pix, conv(-x), mask)
            mix_loss = mixed_pixel_d_loss("hinge", conv(mixed), mask)
            u = mc_dropout_uncertainty(torch.randn(4, 8, device=dev, generator=g))
            d_term, g_term = uncertainty_terms("min", u, 0.1)
        total = sum(losses) + r1 + cons + mix_loss + d_term + g_term
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert total.dtype == torch.float32 and torch.isfinite(total).item()
    assert mask.device.type == "cuda" and conv.weight.grad is not None
    again = cutmix_masks(8, 16, 16, generator=torch.Generator(device=dev).manual_seed(0))
    assert torch.equal(mask, again)


@cuda
def test_cuda_generator_device_mismatch():
    with pytest.raises(ValueError, match="Generator"):
        cutmix_masks(2, 4, 4, generator=torch.Generator(), device="cuda")
    assert cutmix_masks(2, 4, 4, generator=torch.Generator(device="cuda")).device.type == "cuda"


# ---------------------------------------------------------------- ACGAN / TAC-GAN auxiliary losses
def _ce(logits, labels):
    # cross-entropy written out: -log softmax of the true class, averaged
    return float(-(logits - logits.exp().sum(1, keepdim=True).log()).gather(1, labels[:, None]).mean())


def test_aux_losses_known_answers():
    cls_r = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    cls_f = torch.tensor([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    twin_f = torch.tensor([[1.0, -1.0, 0.0], [0.0, 2.0, 0.0]])
    y = torch.tensor([0, 1])
    r, f, t = _ce(cls_r, y), _ce(cls_f, y), _ce(twin_f, y)
    assert losses.aux_d_loss("acgan", cls_r, y, cls_f, twin_f).item() == pytest.approx(r + f, abs=1e-6)
    assert losses.aux_d_loss("real", cls_r, y, cls_f, twin_f).item() == pytest.approx(r, abs=1e-6)
    assert losses.aux_d_loss("tac", cls_r, y, cls_f, twin_f).item() == pytest.approx(r + t, abs=1e-6)
    assert losses.aux_g_loss(cls_f, y).item() == pytest.approx(f, abs=1e-6)
    assert losses.aux_g_loss(cls_f, y, twin_f).item() == pytest.approx(f - t, abs=1e-6)
    # a uniform classifier costs log C per image
    assert losses.aux_g_loss(torch.zeros(2, 3), y).item() == pytest.approx(math.log(3), abs=1e-6)


def test_tac_generator_term_vanishes_when_both_classifiers_agree():
    # G's TAC term is CE(C) - CE(C_twin): when the twin equals the classifier, G gets no class gradient
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    loss = losses.aux_g_loss(logits, y, logits)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7) and logits.grad.abs().max().item() < 1e-7


def test_aux_losses_refuse_missing_inputs():
    y = torch.tensor([0])
    with pytest.raises(ValueError, match="unknown aux mode"):
        losses.aux_d_loss("twin", torch.zeros(1, 3), y)
    with pytest.raises(ValueError, match="twin"):
        losses.aux_d_loss("tac", torch.zeros(1, 3), y, torch.zeros(1, 3))
