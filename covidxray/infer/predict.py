"""Batched inference of trained classifiers and segmenters (used by training's validation, ``evaluate`` and
``segment``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from covidxray.config import Config
from covidxray.data.datasets import to_float
from covidxray.infer.load import load_net
from covidxray.infer.protocol import Classifier, Segmenter, register_loader, require
from covidxray.metrics.features import ClassifierFeatures
from covidxray.utils import cpu_has_native_bf16, resolve_device


@torch.no_grad()
def predict_probs(net: nn.Module, images_u8: torch.Tensor, device: torch.device | str, batch_size: int = 256,
                  mc_samples: int = 1, amp_dtype: torch.dtype | None = None,
                  memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, torch.Tensor]:
    """Class probabilities of uint8 images (N x 1 x S x S) with ``net`` in eval mode, batched.

    With ``mc_samples = K > 1`` (a model with Monte-Carlo dropout) the probabilities are the mean over
    K dropout passes, and ``mutual_information`` (the epistemic part of the entropy, BALD) is returned
    too. The net's training mode is restored afterwards.

    Returns:
        ``probs`` (N, C) float32 on the CPU, ``entropy`` (N,) of the mean prediction in nats, and with
        K > 1 ``mutual_information`` (N,).
    """
    was_training = net.training
    net.eval()
    device = torch.device(device)
    probs, mis = [], []
    try:
        for i in range(0, images_u8.shape[0], batch_size):
            x = to_float(images_u8[i:i + batch_size].to(device, non_blocking=True)).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = net(x, mc_samples=mc_samples) if mc_samples > 1 else net(x)
            p = torch.softmax(logits.float(), dim=-1)
            if mc_samples > 1:  # (K, N, C): mean prediction; MI = H(mean) - mean of the passes' entropies
                p_k = p
                p = p_k.mean(0)
                h_k = -(p_k * p_k.clamp_min(1e-12).log()).sum(-1).mean(0)
                h = -(p * p.clamp_min(1e-12).log()).sum(-1)
                mis.append((h - h_k).clamp_min(0).cpu())
            probs.append(p.cpu())
    finally:
        net.train(was_training)
    n_classes = getattr(net, "n_classes", 0)
    out_probs = torch.cat(probs) if probs else torch.empty(0, n_classes)
    out = {"probs": out_probs,
           "entropy": -(out_probs * out_probs.clamp_min(1e-12).log()).sum(-1)}
    if mc_samples > 1:
        out["mutual_information"] = torch.cat(mis) if mis else torch.empty(0)
    return out


@dataclass
class LoadedClassifier(Classifier):
    """A classifier ready to predict: the network (eval mode), its config, which weights and the checkpoint."""

    net: nn.Module
    cfg: Config
    checkpoint: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.checkpoint["classes"])

    @property
    def image_size(self) -> int:
        return int(self.checkpoint["image_size"])

    @property
    def mc_samples(self) -> int:
        """Passes per image at evaluation: ``eval.mc_samples`` with Monte-Carlo dropout, else 1."""
        return self.cfg.eval.mc_samples if getattr(self.net, "mc_dropout", False) else 1


@register_loader("classifier", Classifier)
def _load_classifier(ckpt: dict[str, Any]) -> LoadedClassifier:
    return LoadedClassifier(*load_net(ckpt, "classifier"), ckpt)


def load_classifier(checkpoint: str | os.PathLike | dict[str, Any], what: str = "this") -> LoadedClassifier:
    """A trained classifier (a checkpoint file, a run folder by the loader rule, or a checkpoint dict read)."""
    return require(checkpoint, Classifier, what)


def classifier_features(run: str | os.PathLike, device: str | torch.device = "cpu",
                        batch_size: int = 64) -> ClassifierFeatures:
    """The in-domain feature space of ``evaluate --cxr-features RUN``: a classifier run's pooled features."""
    loaded = require(run, Classifier, "--cxr-features",
                     "Train one on real data first, e.g. `covidxray train --model resnet18 --data ...`")
    return ClassifierFeatures(loaded, device, batch_size)


# ------------------------------------------------------------------------------------------ segmenters
def inference_settings(device: str | torch.device = "auto",
                       amp: str = "auto") -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype of segmentation inference (``segment``, ``evaluate``).

    ``amp="auto"``: bf16 on a CUDA GPU that supports it and on a CPU with native bf16 (AMX /
    AVX512-BF16), else float32; ``"bf16"`` forces bf16, ``"off"`` float32.
    """
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if amp == "off":
        return dev, None
    if amp == "bf16":
        return dev, torch.bfloat16
    if amp != "auto":
        raise ValueError(f"amp must be auto, bf16 or off, got {amp!r}")
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return dev, torch.bfloat16 if dev.type == "cpu" and cpu_has_native_bf16() else None


def _mask_logits(net: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    logits = net(x).float()
    if tta:  # the mean of the logits of the image and of its mirror image (mirrored back)
        logits = 0.5 * (logits + net(x.flip(-1)).float().flip(-1))
    return logits


@torch.no_grad()
def iter_mask_probs(net: nn.Module, images_u8: torch.Tensor, device: torch.device | str, batch_size: int = 64,
                    amp_dtype: torch.dtype | None = None, memory_format: torch.memory_format = torch.contiguous_format,
                    tta: bool = False):
    """Lung probabilities of uint8 images (N x 1 x S x S, on any device) with a segmenter in eval mode,
    batch by batch: yields ``(start, probs)``, ``probs`` float32 (B x 1 x S x S) on ``device``.

    ``tta``: test-time augmentation, the mean of the logits of each image and of its left-right mirror
    image (the mirrored prediction mirrored back). The net's training mode is restored afterwards.
    """
    was_training = net.training
    net.eval()
    device = torch.device(device)
    try:
        for i in range(0, images_u8.shape[0], batch_size):
            x = to_float(images_u8[i:i + batch_size].to(device, non_blocking=True)).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = _mask_logits(net, x, tta)
            yield i, torch.sigmoid(logits)
    finally:
        net.train(was_training)


@dataclass
class LoadedSegmenter(Segmenter):
    """A segmenter ready to predict: the network (eval mode), its config and the checkpoint."""

    net: nn.Module
    cfg: Config
    checkpoint: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.checkpoint["image_size"])

    @property
    def threshold(self) -> float:
        return float(self.cfg.eval.threshold)

    def tta_note(self) -> str:
        """A warning for ``--tta`` when the model never saw mirrored X-rays in training ("" otherwise)."""
        if getattr(self.cfg.aug, "hflip", False):
            return ""
        return ("note: --tta averages with the mirror image, which this model never saw in training "
                "(aug.hflip=false): a mirrored chest (heart on the right) is new to it, and it lowered the Dice on real "
                "X-rays (docs/segmentation.md)")

    @property
    def fit(self) -> str:
        """How the training X-rays were fitted into squares by ``prepare`` (stretch | pad | crop)."""
        return str(self.checkpoint.get("fit", "stretch"))


@register_loader("segmentation", Segmenter)
def _load_segmenter(ckpt: dict[str, Any]) -> LoadedSegmenter:
    return LoadedSegmenter(*load_net(ckpt, "segmentation"), ckpt)


def load_segmenter(checkpoint: str | os.PathLike | dict[str, Any], what: str = "this") -> LoadedSegmenter:
    """A trained segmenter (a checkpoint file, a run folder by the loader rule, or a checkpoint dict read)."""
    return require(checkpoint, Segmenter, what,
                   "Pass a run folder or checkpoint of `covidxray train --model unet` (or attention_unet)")
