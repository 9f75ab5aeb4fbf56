import pytest
import torch

from covidxray.models.dcgan import DCGANDiscriminator, DCGANGenerator


@pytest.mark.parametrize("size, n_transposed", [(64, 5), (128, 6), (256, 7)])
def test_generator_depth_follows_image_size(size, n_transposed):
    G = DCGANGenerator(size, latent_dim=16, channels=4)
    convs = [m for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convs) == n_transposed
    assert convs[-1].out_channels == 1  # grayscale end to end


def test_widths_are_capped():
    G = DCGANGenerator(256, channels=64, max_channels=128)
    assert max(m.out_channels for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)) <= 128


def test_init_follows_the_paper():
    torch.manual_seed(0)
    D = DCGANDiscriminator(64, channels=64)
    w = torch.cat([m.weight.flatten() for m in D.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.mean().item()) < 2e-3
    assert w.std().item() == pytest.approx(0.02, rel=0.05)


def test_bad_inputs_raise_with_shapes():
    G, D = DCGANGenerator(64, latent_dim=10), DCGANDiscriminator(64)
    with pytest.raises(ValueError, match=r"\(N, 10\)"):
        G(torch.randn(2, 11))
    with pytest.raises(ValueError, match="64, 64"):
        D(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="image_size"):
        DCGANGenerator(100)


def test_init_reaches_spectrally_normalised_weights():
    torch.manual_seed(0)
    D = DCGANDiscriminator(64, channels=64, spectral_norm=True)
    conv = D.trunk[2]
    original = conv.parametrizations.weight.original
    assert original.std().item() == pytest.approx(0.02, rel=0.05)
