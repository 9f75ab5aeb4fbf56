"""The family protocol after training: one loader, and what a loaded model can do.

A family declares how to load its trained models with :func:`register_loader` (its infer module, or any
module that registers a family, a test's included). :func:`load` reads a checkpoint once (a run folder by the
loader rule of :func:`covidxray.checkpoint.resolve_checkpoint_path`) and hands it to the family's loader,
which returns a :class:`Loaded` model. The commands then ask the model for a **capability** instead of
branching on its family:

=====================  =========================================================  ==============================
capability             what it offers                                             used by
=====================  =========================================================  ==============================
:class:`Generator`     ``sample(n, seed, ...)`` uint8 images (per class when       ``sample``, ``evaluate``,
                       conditional), ``draw(counts, seed, device)``                ``data.synthetic``, downstream
:class:`LatentGenerator` ``G(z, y)`` on the device, ``latent_dim``                ``data.synthetic``, downstream
:class:`Classifier`    ``net`` giving class logits; ``classes``                    ``evaluate``, ``--cxr-features``
:class:`Segmenter`     lung probabilities (``covidxray.infer.predict``)            ``segment``, ``evaluate``
:class:`Reconstructor` ``net(x, y)`` -> reconstructions                            ``sample --reconstruct``
:class:`Translator`    a conditional G (masks or X-rays in, images out)            ``sample --images``
:class:`MaskTranslator` X-rays from lung masks: ``translate_masks``                ``sample --from-data``, ``evaluate``
=====================  =========================================================  ==============================

:func:`require` refuses a model without the capability asked, in one line naming the models that have it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import torch

import covidxray.infer
from covidxray.checkpoint import load_checkpoint
from covidxray.errors import CovidXrayError
from covidxray.models.registry import list_models
from covidxray.utils import import_submodules

if TYPE_CHECKING:  # pragma: no cover
    from covidxray.config import Config


class Loaded:
    """A trained model loaded from its checkpoint: the config it was trained with and the checkpoint read.

    Subclasses add one or more capabilities (the classes below); ``checkpoint["path"]`` is the file read.
    """

    cfg: "Config"
    checkpoint: dict[str, Any]
    #: What :func:`require`'s messages call a model with this capability.
    noun: str = "model"

    @property
    def model(self) -> str:
        return self.cfg.model.name

    @property
    def family(self) -> str:
        return self.cfg.family

    @property
    def path(self) -> str:
        return str(self.checkpoint["path"])

    @property
    def classes(self) -> list[str]:
        return list(self.checkpoint.get("classes", []))

    def lacks(self, capability: type) -> str:
        """Why this model lacks ``capability`` (a clause for :func:`require`'s message), or ""."""
        return ""

    #: Sampling options this model takes through :meth:`configure` (a diffusion model: ``steps``,
    #: ``guidance``, ``sampler``).
    options: tuple[str, ...] = ()

    @classmethod
    def check_options(cls, **options: Any) -> dict[str, Any]:
        """The sampling options given (``None`` values dropped), checked without a model: what :meth:`configure`
        would refuse is refused here, so that a study spec fails before anything trains. A model without
        options refuses any."""
        return _refuse_options(options, "this model")

    def configure(self, **options: Any) -> dict[str, Any]:
        """Set sampling options (names in :attr:`options`; ``None`` values are ignored) for every later draw, and
        return the sampling settings in force (recorded by ``sample`` and ``evaluate``); a model without
        options returns ``{}`` and refuses any, naming its family and checkpoint."""
        return _refuse_options(options, f"the {self.family} model in {self.path}")


def _refuse_options(options: dict[str, Any], subject: str) -> dict[str, Any]:
    """``{}`` when no option is given; else one line naming the options and ``subject``."""
    given = [f"--{k}" for k, v in options.items() if v is not None]
    if given:
        raise CovidXrayError(f"{', '.join(given)} do(es) not apply to {subject}",
                             "They set a diffusion model's sampler; drop them")
    return {}


class Generator(Loaded):
    """Draws new images. Subclasses implement :meth:`sample`; ``conditional`` models draw per class."""

    noun = "a generator"

    #: What ``sample``'s output calls the weights it used (``G_ema``, ``G``, ``net``...).
    weights: str = ""

    @property
    def conditional(self) -> bool:
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        return int(self.checkpoint.get("image_size") or self.cfg.data.image_size)

    def label_index(self, name: str) -> int:
        """Index of a class name of a conditional model; a clear error lists the valid names."""
        if not self.conditional:
            raise CovidXrayError(
                f"model '{self.model}' is not class-conditional (trained on {', '.join(self.classes)} merged)",
                "Drop --class, or train a conditional model such as cgan",
            )
        if name not in self.classes:
            raise CovidXrayError(f"unknown class '{name}'; this model knows: {', '.join(self.classes)} (or all)")
        return self.classes.index(name)

    def sample(self, n: int, seed: int = 0, batch_size: int = 256, device: "str | torch.device" = "cpu",
               label: int | None = None, temperature: float = 1.0, only=None) -> "torch.Tensor":
        """``n`` uint8 images (n x 1 x S x S), the same for the same seed (and label); ``only``: the indices of
        ``range(n)`` to draw (image i must not depend on which others are drawn, so that ``sample`` resumes)."""
        raise NotImplementedError

    def draw(self, counts: "list[int] | int", seed: int, device: "torch.device", batch_size: int = 256
             ) -> "tuple[torch.Tensor, torch.Tensor | None]":
        """``counts`` images (an int), or ``counts[k]`` of class k (conditional models), with their labels."""
        if isinstance(counts, int):
            if self.conditional:
                raise ValueError("a conditional generator needs per-class counts")
            return self.sample(counts, seed=seed, batch_size=batch_size, device=device), None
        images, labels = [], []
        for k, n in enumerate(counts):
            if n:  # one latent stream per class and seed: adding a class does not change the others
                images.append(self.sample(n, seed=seed * 1000 + k, batch_size=batch_size, device=device, label=k))
                labels.append(torch.full((n,), k, dtype=torch.long))
        return torch.cat(images), torch.cat(labels)


class LatentGenerator(Generator):
    """A generator of latent draws, cheap enough to run inside another model's training step: ``G(z, y)`` maps
    ``z`` ~ N(0, I) of ``latent_dim`` (and class indices) to images in [-1, 1] on the device (the GANs, a VAE's
    decoder). The classifier's ``data.synthetic`` draws from it at every step."""

    noun = "a latent generator"
    G: Any

    @property
    def latent_dim(self) -> int:
        return int(self.cfg.arch.latent_dim)


class Classifier(Loaded):
    """Predicts a class per X-ray: ``net(x)`` gives logits over ``classes``."""

    noun = "a classifier"


class Segmenter(Loaded):
    """Predicts a lung mask per X-ray."""

    noun = "a segmenter"


class Reconstructor(Loaded):
    """Encodes and decodes X-rays: ``net(x, y)`` -> (reconstruction, mu, logvar)."""

    noun = "an autoencoder"


class Translator(Loaded):
    """Translates one image into another: ``G`` takes a condition (a mask, an X-ray) and gives an image."""

    noun = "an image-to-image model"


class MaskTranslator(Translator):
    """Draws X-rays from 0/1 lung masks (and classes): synthetic (X-ray, mask) pairs, and ``evaluate`` as a
    generator of X-rays from its training masks."""

    noun = "a mask -> X-ray model"

    #: The classes G is conditioned on, in label order ([] when unconditional).
    conditioning: list[str] = []

    def translate_masks(self, masks: "torch.Tensor", labels: "torch.Tensor | None", device,
                        batch_size: int) -> "torch.Tensor":
        """uint8 X-rays (N x 1 x S x S, CPU) of uint8 0/1 masks (and class indices into ``conditioning``)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ the registry
#: family -> loader(checkpoint dict) -> Loaded
LOADERS: dict[str, Callable[[dict[str, Any]], Loaded]] = {}
#: family -> the capabilities its loaded models may have, each with the model feature it needs ("" = all models)
CAPABILITIES: dict[str, tuple[tuple[type, str], ...]] = {}
#: family -> the class whose ``options`` and ``check_options`` its loaded models have (default :class:`Loaded`:
#: none), so that sampling options can be checked before a model of the family exists
SAMPLING: dict[str, type] = {}

L = TypeVar("L", bound=Loaded)


def register_loader(family: str, *capabilities: "type | tuple[type, str]", sampling: type | None = None):
    """Decorator: ``loader(ckpt) -> Loaded`` loads the trained models of ``family`` (a checkpoint dict, read).

    ``capabilities``: what its loaded models can do, each a capability class, or ``(class, feature)`` when only
    the models registered with that feature have it (the autoencoders with a ``prior`` generate).
    ``sampling``: the class that gives its loaded models their sampling ``options`` and ``check_options``
    (:func:`sampling_of`); None: they take none.
    """

    def decorator(loader):
        LOADERS[family] = loader
        CAPABILITIES[family] = tuple(c if isinstance(c, tuple) else (c, "") for c in capabilities)
        if sampling is not None:
            SAMPLING[family] = sampling
        return loader

    return decorator


def _discover() -> None:
    """Import every module of this package once, so that the families' loaders are registered."""
    import_submodules(covidxray.infer.__name__, covidxray.infer.__path__)


def load(path: "str | os.PathLike | dict | Loaded", resume: bool = False) -> Loaded:
    """The trained model of a checkpoint file or run folder (read once; the loader rule picks the file), of a
    checkpoint dict already read, or ``path`` itself when it is a loaded model already."""
    if isinstance(path, Loaded):
        return path
    ckpt = path if isinstance(path, dict) else load_checkpoint(path, resume=resume)
    if ckpt["family"] not in LOADERS:
        _discover()
    try:
        loader = LOADERS[ckpt["family"]]
    except KeyError:
        raise CovidXrayError(f"{ckpt['path']} holds a model of the family '{ckpt['family']}', which this covidxray "
                             f"cannot load (known: {', '.join(sorted(LOADERS))})", "Upgrade covidxray") from None
    return loader(ckpt)


def having(capability: type) -> list[str]:
    """The registered models whose family's loaded models may have ``capability``."""
    _discover()
    return [m.name for m in list_models()
            if any(issubclass(c, capability) and (not feature or feature in m.features)
                   for c, feature in CAPABILITIES.get(m.family, ()))]


def sampling_of(family: str) -> type:
    """The class whose ``options`` and ``check_options`` the loaded models of ``family`` have, known before any of
    them is loaded (:class:`Loaded`, which takes none, for a family that registered none)."""
    if family not in LOADERS:
        _discover()
    return SAMPLING.get(family, Loaded)


def _refuse(path: str, family: str, model: str, capability: type, what: str, fix: str, why: str = ""):
    return CovidXrayError(f"{path} holds a {family} model ('{model}'){': ' + why if why else ''}; "
                          f"{what} needs {capability.noun} ({', '.join(having(capability))})", fix or None)


def require(loaded: "Loaded | str | os.PathLike | dict", capability: type[L], what: str, fix: str = "") -> L:
    """The model (loaded, or a checkpoint to load) as a ``capability``, or one line saying which models have it.

    A checkpoint whose family declares no such capability is refused before its networks are built."""
    if not isinstance(loaded, Loaded):
        ckpt = loaded if isinstance(loaded, dict) else load_checkpoint(loaded)
        if ckpt["family"] not in LOADERS:
            _discover()
        declared = CAPABILITIES.get(ckpt["family"])
        if declared is not None and not any(issubclass(c, capability) for c, _ in declared):
            raise _refuse(ckpt["path"], ckpt["family"], str(ckpt.get("model")), capability, what, fix)
        loaded = load(ckpt)
    if isinstance(loaded, capability):
        return loaded
    raise _refuse(loaded.path, loaded.family, loaded.model, capability, what, fix, loaded.lacks(capability))
