"""Turning a checkpoint into networks: the one place that rebuilds a trained model's architecture."""

from __future__ import annotations

from typing import TYPE_CHECKING

from covidxray.config import config_from_dict
from covidxray.models.registry import DataSpec, get_model

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from covidxray.config import Config


def load_net(ckpt: dict, family: str, key: str = "net") -> tuple["nn.Module", "Config"]:
    """The one trained network ``key`` of a checkpoint (weights loaded, eval mode) and its config: the loaders
    of the one-network families (classifiers, segmenters, autoencoders)."""
    nets, cfg = build_from_checkpoint(ckpt, family)
    net = nets[key]
    net.load_state_dict(ckpt["models"][key])
    return net.eval(), cfg


def build_from_checkpoint(ckpt: dict, family: str) -> tuple[dict[str, "nn.Module"], "Config"]:
    """The networks of a loaded checkpoint, built (untrained) as its run built them, and its config.

    The caller has checked ``ckpt["family"]`` and loads the weights it wants (``G`` or ``G_ema``, ``net``...).
    Checkpoints of version 0.1.0 have no ``image_size``: their config's ``data.image_size`` is used.
    """
    cfg = config_from_dict(ckpt["config"], family=family)
    classes = tuple(ckpt.get("classes", ()))
    size = int(ckpt.get("image_size") or cfg.data.image_size)
    return get_model(cfg.model.name).build(cfg, DataSpec(len(classes), size, 1, classes)), cfg
