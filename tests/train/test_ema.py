"""Tests of the EMA of G's weights (covidxray.train.ema)."""

import copy

import pytest
import torch
from torch import nn

from covidxray.train.ema import EMA, decay_for


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _perturb(model, value=None):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) if value is None else torch.full_like(p, value))


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_ema_copy_is_frozen_and_in_eval_mode():
    net = _net()
    ema = EMA(net)
    assert not ema.ema_model.training and net.training
    assert all(not p.requires_grad for p in ema.ema_model.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(_params(ema.ema_model), _params(net)))
    assert ema.ema_model is not net


def test_decay_zero_copies_and_one_keeps():
    net = _net()
    ema = EMA(net)
    before = _params(ema.ema_model)
    _perturb(net)
    ema.update(net, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(_params(ema.ema_model), before))
    ema.update(net, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(_params(ema.ema_model), _params(net)))


def test_decay_half_gives_midpoint():
    net = _net()
    ema = EMA(net)
    _perturb(ema.ema_model, 1.0)
    _perturb(net, 3.0)
    ema.update(net, 0.5)
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in ema.ema_model.parameters())
    ema.update(net, 0.75)  # 0.75 * 2 + 0.25 * 3
    assert all(torch.allclose(p, torch.full_like(p, 2.25)) for p in ema.ema_model.parameters())


def test_buffers_are_copied_not_averaged():
    net = _net()
    ema = EMA(net)
    net(torch.randn(8, 1, 8, 8))  # train-mode forward updates BatchNorm running stats
    bn, bn_ema = net[1], ema.ema_model[1]
    assert not torch.equal(bn.running_mean, bn_ema.running_mean)
    ema.update(net, 0.9)
    assert torch.equal(bn.running_mean, bn_ema.running_mean)
    assert torch.equal(bn.running_var, bn_ema.running_var)
    assert bn_ema.num_batches_tracked.item() == 1


def test_update_is_not_tracked_by_autograd():
    net = _net()
    ema = EMA(net)
    _perturb(net)
    ema.update(net, 0.5)
    assert all(p.grad_fn is None and not p.requires_grad for p in ema.ema_model.parameters())


def test_mismatched_model_is_rejected():
    ema = EMA(_net())
    with pytest.raises(ValueError, match="parameters"):
        ema.update(nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema.update(_net(), 1.5)


def test_state_dict_round_trip():
    net = _net()
    ema = EMA(net)
    _perturb(net)
    ema.update(net, 0.3)
    state = copy.deepcopy(ema.state_dict())
    other = EMA(_net())
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_params(other.ema_model), _params(ema.ema_model)))
    assert set(state) == set(net.state_dict())


def test_spectral_norm_model():
    net = nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3))
    ema = EMA(net)
    net(torch.randn(2, 3))  # power iteration updates the u/v buffers
    ema.update(net, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.ema_model.buffers(), net.buffers()))


def test_decay_for_known_values():
    assert decay_for(64, 10.0) == 0.5 ** (64 / 10_000)
    assert EMA.decay_for(64, 10.0) == decay_for(64, 10.0)
    # Ramp-up: half-life min(10 000, 20 000 * 0.05 = 1 000) images.
    assert decay_for(64, 10.0, rampup=0.05, images_seen=20_000) == pytest.approx(0.5 ** (64 / 1_000))
    assert decay_for(64, 10.0, rampup=0.05, images_seen=10**7) == decay_for(64, 10.0)
    assert decay_for(64, 10.0, rampup=0.05, images_seen=0) == 0.0  # start: plain copy
    assert decay_for(64, 10.0, rampup=0.0, images_seen=0) == decay_for(64, 10.0)  # 0 = off
    with pytest.raises(ValueError):
        decay_for(64, 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_update_without_host_syncs():
    net = _net().cuda()
    ema = EMA(net)
    net(torch.randn(8, 1, 8, 8, device="cuda"))
    _perturb(net, 3.0)
    with torch.no_grad():
        for p in ema.ema_model.parameters():
            p.fill_(1.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.update(net, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(bool((p == 2.0).all()) for p in ema.ema_model.parameters())
    assert torch.equal(ema.ema_model[1].running_mean, net[1].running_mean)
