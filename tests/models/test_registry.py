"""The registry, and shape tests over every registered model of every family (a new model is covered
by being registered; a new family must add its check to FAMILY_CHECKS)."""

import pytest
import torch

from covidxray.config import CONFIG_DIR, FAMILIES, resolve_config
from covidxray.errors import CovidXrayError
from covidxray.models import DataSpec, get_model, list_models, register_model

MODELS = [spec.name for spec in list_models()]


def test_unknown_model_lists_valid_names():
    with pytest.raises(KeyError) as err:
        get_model("stylegan9")
    assert isinstance(err.value, CovidXrayError)
    assert "unknown model 'stylegan9'" in str(err.value)
    for name in MODELS:
        assert name in str(err.value)


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="already registered"):
        register_model("rawgan", family="gan", paper="x", summary="x")(lambda cfg, data: {})


def test_a_model_of_an_undeclared_family_is_refused_when_its_config_is_resolved(monkeypatch):
    from covidxray.config import resolve_config
    from covidxray.errors import CovidXrayError
    from covidxray.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the registration ends with the test
    register_model("flow", family="flowmatching", paper="x", summary="x")(lambda cfg, data: {})
    with pytest.raises(CovidXrayError, match="unknown model family 'flowmatching'; known families: autoencoder, "
                                             "classifier, diffusion, gan, image2image, segmentation"):
        resolve_config("flow")


def test_every_family_has_models_a_task_and_a_shape_check():
    from covidxray.train.tasks import TASKS

    assert set(FAMILIES) == set(TASKS) == set(FAMILY_CHECKS)
    assert {spec.family for spec in list_models()} == set(FAMILIES)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_has_a_config_file_and_documentation(name):
    spec = get_model(name)
    assert (CONFIG_DIR / f"{name}.yaml").is_file()
    assert spec.paper and spec.summary
    assert spec.build.__doc__
    resolve_config(name)  # its YAML holds only valid keys of its family


def _check_gan(spec, nets, cfg, size):
    k = 3 if spec.conditional else 0
    z = torch.randn(2, cfg.arch.latent_dim)
    y = torch.tensor([0, 2]) if spec.conditional else None
    assert nets["G"].n_classes == nets["D"].n_classes == k
    x = nets["G"](z, y)
    assert x.shape == (2, 1, size, size)
    assert x.min() >= -1 and x.max() <= 1
    logits = nets["D"](x, y).logits
    assert logits.shape == (2,)
    logits.sum().backward()
    assert all(p.grad is not None for p in nets["G"].parameters())


def _check_classifier(spec, nets, cfg, size):
    net = nets["net"]
    x = torch.rand(2, 1, size, size) * 2 - 1
    logits = net(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert net.features(x).shape == (2, net.n_features)


def _check_segmentation(spec, nets, cfg, size):
    net = nets["net"]
    x = torch.rand(2, 1, size, size) * 2 - 1
    logits = net(x)
    assert logits.shape == (2, 1, size, size) and torch.isfinite(logits).all()
    logits.mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="multiples of"):
        net(torch.zeros(1, 1, size + 8, size))


def _check_autoencoder(spec, nets, cfg, size):
    net = nets["net"]
    k = 3 if spec.conditional else 0
    assert net.n_classes == k and net.decoder.n_classes == k
    x = torch.rand(2, 1, size, size) * 2 - 1
    y = torch.tensor([0, 2]) if k else None
    eps = torch.randn(2, cfg.arch.latent_dim)
    recon, mu, logvar = net(x, y, eps)
    assert recon.shape == x.shape and recon.min() >= -1 and recon.max() <= 1
    assert mu.shape == (2, cfg.arch.latent_dim) and (logvar is not None) == ("prior" in spec.features)
    (recon.mean() + mu.pow(2).mean()).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net.decoder(eps, y).shape == x.shape  # the decoder has a GAN generator's interface


def _check_image2image(spec, nets, cfg, size):
    from covidxray.models.pix2pix import condition

    G, D = nets["G"], nets["D"]
    masks = (torch.rand(2, 1, size, size) > 0.5).to(torch.uint8)
    c = condition(masks, torch.tensor([0, 2]), 3)  # the mask + 3 class maps (DataSpec.example: 3 classes)
    x = G(c)
    assert c.shape == (2, 4, size, size) and x.shape == (2, 1, size, size) and x.min() >= -1 and x.max() <= 1
    logits = D(c, x)
    assert logits.ndim == 4 and logits.shape[:2] == (2, 1) and logits.shape[-1] > 1  # one logit per patch
    logits.mean().backward()
    assert all(p.grad is not None for p in G.parameters())


def _check_diffusion(spec, nets, cfg, size):
    from covidxray.models.diffusion import precondition

    net = nets["net"]
    assert net.n_classes == 3  # DataSpec.example: 3 classes, plus the "no class" entry of guidance
    x = torch.rand(2, 1, size, size) * 2 - 1
    sigma = torch.tensor([0.1, 10.0])
    cond = {"cond": torch.ones(2, 1, size, size)} if net.cond_channels else {}  # edm_mask: the mask channel
    out = precondition(net, x, sigma, cfg.edm.sigma_data, labels=torch.tensor([0, 3]), **cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


FAMILY_CHECKS = {"diffusion": _check_diffusion, "gan": _check_gan, "classifier": _check_classifier, "segmentation": _check_segmentation,
                 "autoencoder": _check_autoencoder, "image2image": _check_image2image}
#: The sizes each family is checked at (the classifiers' smallest and largest, within each model's limit).
FAMILY_SIZES = {"gan": (64, 128, 256), "classifier": (64, 299), "segmentation": (64, 256), "autoencoder": (32, 128),
                "image2image": (32, 256), "diffusion": (32, 128)}
SMALL = {"gan": ["arch.g_channels=8", "arch.d_channels=8"], "classifier": [], "segmentation": ["arch.width=8"],
         "autoencoder": ["arch.channels=8"], "image2image": ["arch.g_channels=8", "arch.d_channels=8"],
         "diffusion": ["arch.channels=8", "arch.depth=2"]}


@pytest.mark.parametrize("name, size", [(n, s) for n in MODELS for s in FAMILY_SIZES[get_model(n).family]
                                        if s >= get_model(n).min_image_size])
def test_every_model_builds_and_runs_at_its_sizes(name, size):
    spec = get_model(name)
    cfg = resolve_config(name, sets=[f"data.image_size={size}", *SMALL[spec.family]])
    torch.manual_seed(0)
    nets = spec.build(cfg, DataSpec.example(size, 3))
    FAMILY_CHECKS[spec.family](spec, nets, cfg, size)
