import pytest
import torch

from covidxray.models import get_model
from covidxray.models.conditional import ACGANDiscriminator, ConditionalGenerator, ProjectionDiscriminator

from tests.fixtures import build_small as build


@pytest.mark.parametrize("name", ["cgan", "acgan"])
@pytest.mark.parametrize("size", [64, 128, 256])
def test_shapes_range_and_gradients_at_each_size(name, size):
    cfg, nets = build(name, size)
    G, D = nets["G"], nets["D"]
    assert get_model(name).conditional
    assert G.n_classes == D.n_classes == 3  # the data's classes (build_small: 3)
    assert (G.latent_dim, G.image_size, D.image_size) == (cfg.arch.latent_dim, size, size)
    y = torch.tensor([0, 2])
    x = G(torch.randn(2, cfg.arch.latent_dim), y)
    assert x.shape == (2, 1, size, size)
    assert x.min() >= -1 and x.max() <= 1
    out = D(x, y)
    assert out.logits.shape == (2,) and out.pixel_logits is None
    loss = out.logits.sum()
    if name == "acgan":
        assert out.class_logits.shape == (2, 3)
        loss = loss + out.class_logits.logsumexp(1).sum()
    else:
        assert out.class_logits is None
    loss.backward()
    assert all(p.grad is not None for p in G.parameters())


@pytest.mark.parametrize("name", ["cgan", "acgan"])
def test_missing_or_bad_labels_raise_with_shapes(name):
    cfg, nets = build(name)
    G, D = nets["G"], nets["D"]
    z = torch.randn(2, cfg.arch.latent_dim)
    with pytest.raises(ValueError, match=r"pass labels y of shape \(2,\)"):
        G(z)
    with pytest.raises(ValueError, match=r"shape \(2,\), got \(3,\)"):
        G(z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        G(z, torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(N, 100\)"):
        G(torch.randn(2, 7), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="64, 64"):
        D(torch.randn(2, 1, 32, 32), torch.zeros(2, dtype=torch.long))
    if name == "cgan":
        with pytest.raises(ValueError, match=r"\(2,\)"):
            D(torch.randn(2, 1, 64, 64))
        with pytest.raises(ValueError, match=r"shape \(2,\), got \(2, 1\)"):
            D(torch.randn(2, 1, 64, 64), torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("name", ["cgan", "acgan"])
def test_generator_output_depends_on_the_label(name):
    cfg, nets = build(name)
    G = nets["G"]
    z = torch.randn(1, cfg.arch.latent_dim).repeat(3, 1)
    x = G(z, torch.tensor([0, 1, 2]))  # training mode, mixed labels (as in training)
    assert not torch.allclose(x[0], x[1]) and not torch.allclose(x[1], x[2])
    G.eval()  # sampling: same z, one label per call
    assert not torch.allclose(G(z[:1], torch.tensor([0])), G(z[:1], torch.tensor([2])))


def test_projection_discriminator_logit_depends_on_the_label():
    _, nets = build("cgan")
    D = nets["D"].eval()
    x = torch.rand(4, 1, 64, 64) * 2 - 1
    a, b = D(x, torch.zeros(4, dtype=torch.long)).logits, D(x, torch.full((4,), 2)).logits
    assert (a - b).abs().min() > 1e-6


def test_acgan_discriminator_ignores_y_and_predicts_classes():
    _, nets = build("acgan")
    D = nets["D"].eval()
    x = torch.rand(4, 1, 64, 64) * 2 - 1
    base = D(x)
    assert base.class_logits.shape == (4, 3)
    for y in (torch.zeros(4, dtype=torch.long), torch.full((4,), 2)):
        out = D(x, y)
        assert torch.equal(out.logits, base.logits) and torch.equal(out.class_logits, base.class_logits)


@pytest.mark.parametrize("name", ["cgan", "acgan"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_mc_dropout_gives_k_stochastic_passes(name, train_mode):
    _, nets = build(name, 64, "arch.d_dropout=0.5")
    D = nets["D"].train(train_mode)
    x, y = torch.rand(3, 1, 64, 64) * 2 - 1, torch.tensor([0, 1, 2])
    out = D(x, y, mc_samples=8)
    assert out.logits.shape == (8, 3)
    assert not torch.allclose(out.logits, out.logits[:1].expand(8, 3))  # stochastic even in eval mode
    if name == "acgan":
        assert out.class_logits.shape == (3, 3)
    # a single pass drops only in training mode
    one, two = D(x, y).logits, D(x, y).logits
    assert one.shape == (3,)
    assert torch.equal(one, two) != train_mode


@pytest.mark.parametrize("name", ["cgan", "acgan"])
def test_mc_samples_without_dropout_are_identical(name):
    _, nets = build(name)  # arch.d_dropout = 0
    D = nets["D"].eval()
    x, y = torch.rand(3, 1, 64, 64) * 2 - 1, torch.tensor([0, 1, 2])
    out = D(x, y, mc_samples=5)
    assert out.logits.shape == (5, 3)
    assert torch.allclose(out.logits, D(x, y).logits.expand(5, 3), atol=1e-5)
    with pytest.raises(ValueError, match="mc_samples"):
        D(x, y, mc_samples=0)


def test_n_classes_come_from_the_data_and_spectral_norm_from_the_config():
    _, nets = build("cgan", 64, n_classes=2)
    assert nets["G"].n_classes == nets["D"].n_classes == 2
    _, nets = build("acgan", 64, "arch.g_spectral_norm=true", "arch.d_spectral_norm=false", n_classes=4)
    G, D = nets["G"], nets["D"]
    assert D(torch.zeros(2, 1, 64, 64)).class_logits.shape == (2, 4)
    assert G.layers[1].gamma.num_embeddings == 4  # class-conditional BatchNorm after the first layer
    assert any(torch.nn.utils.parametrize.is_parametrized(m) for m in G.modules())
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in D.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in D.modules())
    _, nets = build("cgan")  # configs/cgan.yaml turns SN on in D
    assert all(torch.nn.utils.parametrize.is_parametrized(m) for m in nets["D"].modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding)))


@pytest.mark.parametrize("D_cls", [ProjectionDiscriminator, ACGANDiscriminator])
def test_channels_last_and_bf16_autocast(D_cls):
    torch.manual_seed(0)
    G = ConditionalGenerator(64, latent_dim=16, n_classes=3, channels=8)
    D = D_cls(64, n_classes=3, channels=8, dropout=0.2)
    G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = D(G(torch.randn(4, 16), y), y, mc_samples=4)
    assert out.logits.shape == (4, 4) and torch.isfinite(out.logits.float()).all()
    out.logits.float().sum().backward()
    assert all(p.grad is not None for p in G.parameters())


@pytest.mark.parametrize("name", ["cgan", "acgan"])
def test_registry_declares_mc_dropout_support(name):
    assert "uncertainty" in get_model(name).features


def test_label_survives_a_single_class_training_batch():
    # With the label concatenated to z, BatchNorm in training mode removed it from a batch whose
    # labels were all equal; class-conditional BatchNorm applies the class after normalising.
    torch.manual_seed(0)
    G = ConditionalGenerator(64, latent_dim=16, n_classes=3, channels=8).train()
    for cbn in (m for m in G.modules() if m.__class__.__name__ == "ConditionalBatchNorm2d"):
        torch.nn.init.normal_(cbn.gamma.weight, 1.0, 0.5)
        torch.nn.init.normal_(cbn.beta.weight, 0.0, 0.5)
    z = torch.randn(8, 16)
    a = G(z, torch.zeros(8, dtype=torch.long))
    b = G(z, torch.full((8,), 2, dtype=torch.long))
    assert (a - b).abs().mean() > 0.05


def test_doutput_split_separates_every_field():
    from covidxray.models.common import DOutput

    out = DOutput(torch.arange(6.0), class_logits=torch.arange(18.0).view(6, 3), twin_logits=None,
                  pixel_logits=torch.zeros(6, 1, 2, 2))
    a, b = out.split(2)
    assert a.logits.tolist() == [0.0, 1.0] and b.logits.tolist() == [2.0, 3.0, 4.0, 5.0]
    assert a.class_logits.shape == (2, 3) and b.class_logits[0].tolist() == [6.0, 7.0, 8.0]
    assert a.pixel_logits.shape == (2, 1, 2, 2) and b.twin_logits is None
    with pytest.raises(ValueError, match="per-image logits"):
        DOutput(torch.zeros(4, 6)).split(3)  # (K, N) Monte-Carlo logits cannot be split this way


def test_tac_discriminator_has_a_twin_head_on_the_same_features():
    d = ACGANDiscriminator(64, 3, channels=8, max_channels=32, twin=True)
    out = d(torch.randn(5, 1, 64, 64))
    assert out.twin_logits.shape == (5, 3) and out.class_logits.shape == (5, 3)
    assert not torch.equal(out.twin_logits, out.class_logits)  # separately initialised heads
    assert ACGANDiscriminator(64, 3, channels=8, max_channels=32)(torch.randn(2, 1, 64, 64)).twin_logits is None


def test_doutput_mc_split_takes_the_first_pass_as_main():
    from covidxray.models.common import DOutput

    k_logits = torch.arange(6.0).view(3, 2)  # K = 3 passes, N = 2 images
    logits_k, main = DOutput(k_logits, class_logits=torch.ones(2, 3)).mc_split()
    assert logits_k is k_logits and main.logits.tolist() == [0.0, 1.0] and main.class_logits.shape == (2, 3)
    with pytest.raises(ValueError, match="Monte-Carlo logits"):
        DOutput(torch.zeros(2)).mc_split()


def test_conditional_batchnorm_known_answer():
    from covidxray.models.conditional import ConditionalBatchNorm2d

    cbn = ConditionalBatchNorm2d(2, n_classes=2).train()
    with torch.no_grad():
        cbn.gamma.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        cbn.beta.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, -1.0]]))
    x = torch.randn(4, 2, 3, 3).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 1, 0])
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + cbn.bn.eps)
    expected = normed * cbn.gamma.weight[y][:, :, None, None] + cbn.beta.weight[y][:, :, None, None]
    out = cbn(x, y)
    assert torch.allclose(out, expected, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the layout the next conv wants
