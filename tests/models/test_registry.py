import pytest
import torch

from covidxray.config import CONFIG_DIR, resolve_config
from covidxray.errors import CovidXrayError
from covidxray.models import get_model, list_models, register_model

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
        register_model("rawgan", family="gan", paper="x", summary="x")(lambda cfg: {})


@pytest.mark.parametrize("name", MODELS)
def test_every_model_has_a_config_file_and_documentation(name):
    spec = get_model(name)
    assert (CONFIG_DIR / f"{name}.yaml").is_file()
    assert spec.paper and spec.summary
    assert spec.build.__doc__


@pytest.mark.parametrize("name", [n for n in MODELS if get_model(n).family == "gan"])
@pytest.mark.parametrize("size", [64, 128, 256])
def test_every_gan_builds_and_runs_at_each_size(name, size):
    cfg = resolve_config(name, sets=[f"data.image_size={size}", "arch.g_channels=8", "arch.d_channels=8"])
    spec = get_model(name)
    cfg.data.n_classes = 3 if spec.conditional else 0  # the trainer sets this from the data
    nets = spec.build(cfg)
    z = torch.randn(2, cfg.arch.latent_dim)
    y = torch.tensor([0, 2]) if spec.conditional else None
    assert nets["G"].n_classes == nets["D"].n_classes == cfg.data.n_classes
    x = nets["G"](z, y)
    assert x.shape == (2, 1, size, size)
    assert x.min() >= -1 and x.max() <= 1
    logits = nets["D"](x, y).logits
    assert logits.shape == (2,)
    logits.sum().backward()
    assert all(p.grad is not None for p in nets["G"].parameters())
