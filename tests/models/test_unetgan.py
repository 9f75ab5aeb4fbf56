import pytest
import torch

from covidxray.models import get_model
from covidxray.models.dcgan import DCGANGenerator
from covidxray.models.unetgan import UNetDiscriminator

from tests.fixtures import build_small as build


@pytest.mark.parametrize("name", ["unetgan", "unetcgan"])
@pytest.mark.parametrize("size", [64, 128, 256])
def test_shapes_range_and_gradients_at_each_size(name, size):
    cfg, nets = build(name, size)
    G, D = nets["G"], nets["D"]
    conditional = name == "unetcgan"
    assert get_model(name).conditional == conditional
    assert G.n_classes == D.n_classes == (3 if conditional else 0)
    y = torch.tensor([0, 2])
    x = G(torch.randn(2, cfg.arch.latent_dim), y)
    assert x.shape == (2, 1, size, size)
    assert x.min() >= -1 and x.max() <= 1
    out = D(x, y)
    assert out.logits.shape == (2,)
    assert out.pixel_logits.shape == (2, 1, size, size)
    assert out.class_logits is None
    (out.logits.sum() + out.pixel_logits.mean()).backward()
    assert all(p.grad is not None for p in G.parameters())
    assert all(p.grad is not None for p in D.parameters())


def test_unconditional_d_ignores_labels():
    _, nets = build("unetgan")
    assert isinstance(nets["G"], DCGANGenerator)
    D = nets["D"].eval()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    a, b = D(x), D(x, torch.tensor([1, 2]))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.pixel_logits, b.pixel_logits)


def test_conditional_labels_are_checked_and_change_both_outputs():
    cfg, nets = build("unetcgan")
    G, D = nets["G"], nets["D"].eval()
    with pytest.raises(ValueError, match=r"pass labels y of shape \(2,\)"):
        G(torch.randn(2, cfg.arch.latent_dim))
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with pytest.raises(ValueError, match=r"pass labels y of shape \(2,\)"):
        D(x)
    with pytest.raises(ValueError, match=r"shape \(2,\), got \(3,\)"):
        D(x, torch.zeros(3, dtype=torch.long))
    a, b = D(x, torch.tensor([0, 0])), D(x, torch.tensor([2, 2]))
    assert (a.logits - b.logits).abs().min() > 1e-6
    assert not torch.allclose(a.pixel_logits, b.pixel_logits)


@pytest.mark.parametrize("name", ["unetgan", "unetcgan"])
def test_pixel_logits_follow_local_content(name):
    _, nets = build(name)
    D = nets["D"].eval()
    torch.manual_seed(1)
    x = torch.rand(4, 1, 64, 64) * 2 - 1
    y = torch.tensor([0, 1, 2, 0])
    x2 = x.clone()
    x2[..., :8, :8] = torch.rand(4, 1, 8, 8) * 2 - 1  # perturb the top-left corner only
    diff = (D(x2, y).pixel_logits - D(x, y).pixel_logits).abs()[:, 0]
    near, far = diff[:, :16, :16].mean(), diff[:, 32:, 32:].mean()
    assert near > 0 and near > 10 * far


def test_mc_dropout_on_the_image_logit_only():
    _, nets = build("unetcgan", 64, "arch.d_dropout=0.5")
    D = nets["D"].eval()
    x, y = torch.rand(3, 1, 64, 64) * 2 - 1, torch.tensor([0, 1, 2])
    out = D(x, y, mc_samples=8)
    assert out.logits.shape == (8, 3)
    assert not torch.allclose(out.logits, out.logits[:1].expand(8, 3))
    assert torch.equal(out.pixel_logits, D(x, y).pixel_logits)
    _, nets = build("unetgan")
    D = nets["D"].eval()
    out = D(x, mc_samples=4)
    assert torch.allclose(out.logits, D(x).logits.expand(4, 3), atol=1e-5)


def test_widths_are_capped_and_decoder_is_half_width():
    D = UNetDiscriminator(256, channels=64, max_channels=128)
    convs = [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)]
    assert max(c.out_channels for c in convs) <= 128
    enc = [stage[0].out_channels for stage in D.encoder]
    dec = [block.conv.out_channels for block in D.decoder]
    assert dec == [w // 2 for w in reversed(enc[:-1])]


@pytest.mark.parametrize("name", ["unetgan", "unetcgan"])
def test_channels_last_and_bf16_autocast(name):
    cfg, nets = build(name, 64, "arch.d_dropout=0.2", "arch.g_spectral_norm=true")
    G = nets["G"].to(memory_format=torch.channels_last)
    D = nets["D"].to(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = D(G(torch.randn(4, cfg.arch.latent_dim), y), y, mc_samples=4)
    assert out.logits.shape == (4, 4) and out.pixel_logits.shape == (4, 1, 64, 64)
    assert torch.isfinite(out.pixel_logits.float()).all()
    (out.logits.float().sum() + out.pixel_logits.float().mean()).backward()
    assert all(p.grad is not None for p in G.parameters())


@pytest.mark.parametrize("name", ["unetgan", "unetcgan"])
def test_registry_declares_cutmix_and_mc_dropout_support(name):
    assert {"cutmix", "uncertainty"} <= set(get_model(name).features)
