"""The classifier task: cross-entropy on augmented batches, validation metrics every ``eval.every`` epochs.

One step: the uint8 batch (already on the device) becomes float in [-1, 1], gets a random affine warp
and brightness/contrast jitter on the device (:mod:`covidxray.data.transforms`, drawn from a generator
saved with the run), goes through the network under the run's precision, and one optimizer step
follows on the cross-entropy (optional class weights and label smoothing). The learning rate follows
``optim.schedule`` per step (linear warm-up, then cosine or step), set on the host before the step;
with CUDA graphs it lives in a device tensor that the captured AdamW update reads.

Validation (:meth:`ClassifierTask.evaluate`) reports loss (the mean negative log-likelihood of the
true class), accuracy, balanced accuracy, macro-F1 and, when every class has images in the split,
one-vs-rest ROC-AUC; with ``model.mc_dropout`` the prediction is the mean over ``eval.mc_samples``
dropout passes. The loop keeps ``best.pt`` by ``eval.metric`` (default: loss) and stops early after
``eval.patience`` validations without improvement, as the seed project did.

Synthetic images (``data.synthetic``, ``data.synthetic_ratio`` r; the downstream-classification
experiments: real only, real + synthetic, synthetic only = TSTR / "GAN-train") come from one of three sources,
none of them trained or saved with the classifier:

* a trained class-conditional **latent generator** (a GAN's ``G_ema`` when it has one, the cVAE's decoder; a
  checkpoint file or run folder), loaded once on the device in eval mode without gradients: every step it
  generates images on the device, never on disk, labels drawn from the real training split's class frequencies
  (inverse CDF, :func:`sample_labels`) and latents from a normal distribution, both from a generator of their
  own (``rng`` ``synthetic``, seeded ``train.seed + 5``, saved and restored, so a resumed run stays bit-exact);
  G runs in full precision (as ``covidxray sample``);
* any other class-conditional **generator** (a diffusion model, whose dozens of network evaluations per image
  would cost more than the classifier's step), or a latent one with ``data.synthetic_pool`` N > 0: a **pool** of
  N images (default: as many as the real training split) is drawn once at the start, per class in proportion to
  the real training split (:func:`~covidxray.data.datasets.class_counts`), seeded ``train.seed + 7`` (the same
  pool on resume), and kept on the device;
* a **folder of generated PNGs** with one sub-folder per class (``covidxray sample``'s OUT; ``evaluate
  --downstream`` writes one per evaluation), read once as a pool; its class mix is the folder's.

From a pool, each step takes its images at random with replacement (``rng`` ``synthetic``). Images are rounded
to uint8 and resized to the classifier's side on the device (as :func:`~covidxray.data.datasets.resize_u8`) when
the sides differ. With 0 < r < 1 the step's B real
images are kept and ``round(B * r / (1 - r))`` generated ones are appended (a fraction r of the
batch; runs with and without synthetic data take the same steps over the same real images); with
r = 1 the B images of a step are all generated (the real batch is left unused; an epoch keeps the
real data's number of steps, and ``kimg`` in the logs counts real images). Augmentation, loss and the
logged accuracy then cover the whole batch. The generator must be class-conditional and know the
training data's classes, in the same order; otherwise the run is refused. Such runs do not use
CUDA graphs (the generation inside a captured step is untested on a GPU): they train eagerly.

Checkpoint entries it adds: ``models`` ``net``; ``optimizers``/``scalers`` ``net``; ``rng`` ``aug``
(and ``synthetic``); ``class_weights``; with ``data.synthetic``, ``synthetic`` (the generator's
checkpoint file, its step and the weights used: a resume whose generator changed says so).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from covidxray.config.classifier import parse_class_weights
from covidxray.data.datasets import class_counts, read_class_folders, resize_u8, to_float, to_uint8
from covidxray.data.transforms import augment_batch
from covidxray.errors import CovidXrayError
from covidxray.infer.predict import predict_probs
from covidxray.infer.protocol import Generator, LatentGenerator, having, require
from covidxray.metrics import classification as M
from covidxray.models.classifiers import load_pretrained
from covidxray.models.registry import list_models
from covidxray.train.optim import lr_stat
from covidxray.train.tasks.supervised import SupervisedTask


def class_cdf(counts: torch.Tensor) -> torch.Tensor:
    """Cumulative class frequencies (float, last value exactly 1) of per-class image counts."""
    cdf = counts.double().cumsum(0) / counts.sum()
    cdf[-1] = 1.0
    return cdf.float()


def sample_labels(cdf: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` class indices (int64, on ``cdf``'s device) drawn with the frequencies that ``cdf``
    (:func:`class_cdf`) describes, by the inverse CDF; no host sync."""
    u = torch.rand(n, generator=generator, device=cdf.device)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)


def synthetic_count(batch_size: int, ratio: float) -> int:
    """Generated images per step for ``data.synthetic_ratio``: ``round(B * r / (1 - r))`` beside the B
    real ones for r < 1, B (and no real ones) for r = 1."""
    return batch_size if ratio >= 1 else int(round(batch_size * ratio / (1.0 - ratio)))


class ClassifierTask(SupervisedTask):
    """Trains a registered classifier (the ``classifier`` family); see the module docstring."""

    family = "classifier"
    resizes_data = True
    evaluates = True
    shards_evaluation = True  # under torchrun each rank scores its shard of the validation split
    progress_keys = ("loss", "acc", "lr")
    bf16_on_native_cpu = True  # measured: resnet18 at 224 px trains 2.5x faster in bf16 on an AMX CPU

    def __init__(self, trainer):
        super().__init__(trainer)
        cfg, spec, dev, data = self.cfg, trainer.spec, self.device, trainer.data
        size = trainer.data_spec.image_size
        if spec.min_image_size and size < spec.min_image_size:
            raise CovidXrayError(f"{spec.name} needs images of at least {spec.min_image_size} px; the data are "
                                 f"{size} px", f"Pass --image-size {max(spec.min_image_size, 224)} (resized on the device)")
        k = trainer.data_spec.n_classes
        counts = torch.bincount(data.labels.cpu(), minlength=k)
        if k < 2:
            raise CovidXrayError(f"a classifier needs at least 2 classes; {cfg.data.path} ({cfg.data.split}) has "
                                 f"{', '.join(data.classes)}", "Drop --classes or name two or more classes")
        empty = [c for c, n in zip(data.classes, counts.tolist()) if n == 0]
        if empty:
            raise CovidXrayError(f"class(es) {', '.join(empty)} have no images in the {cfg.data.split} split of "
                                 f"{cfg.data.path}", "Prepare the data again, or leave them out with --classes")

        self.setup_net(spec.build(cfg, trainer.data_spec)["net"])
        if cfg.model.pretrained and getattr(trainer, "resuming", False) is False:
            loaded = load_pretrained(self.net, cfg.model.pretrained)
            trainer.log(f"pretrained: {loaded['loaded']} tensors from {cfg.model.pretrained} (first layer summed "
                        f"to 1 channel; {loaded['skipped_head']} head tensors left out, the head starts fresh)")


        weights = parse_class_weights(cfg.loss.class_weights)
        if weights == "balanced":  # inverse class frequency, mean weight per image 1 (scikit-learn's rule)
            w = counts.sum() / (k * counts.float())
        elif weights == "none":
            w = None
        else:
            if len(weights) != k:
                raise CovidXrayError(f"config key 'loss.class_weights' has {len(weights)} weights but the data have "
                                     f"{k} classes ({', '.join(data.classes)}, in this order)")
            w = torch.tensor(weights)
        self.class_weights = None if w is None else w.float().to(dev)
        self.aug_gen = torch.Generator(device=dev).manual_seed(cfg.train.seed + 3)
        a = cfg.aug
        self.aug_kw = dict(rotate=a.rotate, scale=a.scale, translate=a.translate, brightness=a.brightness,
                           contrast=a.contrast, hflip=a.hflip)

        # Synthetic images (module docstring): drawn at every step from G, or taken from a pool; n_synthetic 0: none.
        self.G: torch.nn.Module | None = None
        self.pool: torch.Tensor | None = None
        self.n_synthetic = 0
        self.synthetic_only = False
        if cfg.data.synthetic:
            self._init_synthetic(counts)

    def _init_synthetic(self, counts: torch.Tensor) -> None:
        cfg, t, dev = self.cfg, self.trainer, self.device
        # An absolute path, as data.path: config.yaml and the checkpoint then find it from anywhere.
        src = Path(cfg.data.synthetic).expanduser().resolve()
        cfg.data.synthetic = str(src)
        r = cfg.data.synthetic_ratio
        n = synthetic_count(t.rank_batch_size, r)  # per rank under torchrun (the real images are per rank too)
        if n < 1:
            raise CovidXrayError(f"data.synthetic_ratio={r:g} with {t.rank_batch_size} real images a step adds "
                                 f"round({t.rank_batch_size} * {r:g} / {1 - r:g}) = 0 generated images",
                                 "Raise data.synthetic_ratio or train.batch_size")
        classes = list(t.data.classes)
        self.n_synthetic, self.synthetic_only = n, r >= 1
        self.synthetic_size = t.data_spec.image_size
        self.synthetic_gen = torch.Generator(device=dev).manual_seed(cfg.train.seed + 5)
        if src.is_dir() and not (src / "checkpoints").is_dir() and not (src / "config.yaml").is_file():
            images, labels = read_class_folders(src, classes, "data.synthetic")  # generated PNGs
            digest = hashlib.sha1(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]
            self.synthetic_source = {"path": str(src), "model": "folder", "weights": f"sha1 {digest}", "step": 0,
                                     "epoch": 0, "pool": len(images)}
            self._set_pool(images, labels, f"{len(images)} images of {src}")
            return
        try:
            loaded = require(src, Generator, "data.synthetic")
        except CovidXrayError as exc:  # no checkpoint there, not a generator, ...: its own message, the key named
            raise CovidXrayError(f"data.synthetic: {exc.message}", exc.hint) from None
        ckpt = loaded.checkpoint
        path, model = str(ckpt["path"]), loaded.cfg.model.name
        if not loaded.conditional:
            conditional = ", ".join(m.name for m in list_models() if m.conditional and m.name in having(Generator))
            raise CovidXrayError(f"data.synthetic: unconditional generators cannot add labelled images; {path} holds "
                                 f"'{model}', which is not class-conditional",
                                 f"Train a class-conditional generator ({conditional}) on the classifier's classes and "
                                 f"pass its run")
        if loaded.classes != classes:
            raise CovidXrayError(f"data.synthetic: the generator in {path} was trained on the classes "
                                 f"{', '.join(loaded.classes)} but the classifier's training data have "
                                 f"{', '.join(classes)}",
                                 "Train the classifier on the classes of the generator (data.classes), or pass a "
                                 "conditional generator trained on these")
        self.synthetic_source = {"path": path, "model": model, "weights": loaded.weights,
                                 "step": int(ckpt.get("step", 0)), "epoch": int(ckpt.get("epoch", 0))}
        trained = (f"the generator was trained {self.synthetic_source['step']} steps "
                   f"({self.synthetic_source['epoch']} epochs)")
        if isinstance(loaded, LatentGenerator) and not cfg.data.synthetic_pool:  # cheap: drawn at every step
            self.G = loaded.G.to(dev, memory_format=t.memory_format).eval().requires_grad_(False)
            self.latent_dim = loaded.latent_dim
            self.synthetic_cdf = class_cdf(counts).to(dev)  # the real training split's class frequencies
            g_size = int(ckpt.get("image_size") or loaded.cfg.data.image_size)
            resized = f", resized {g_size} -> {self.synthetic_size} px" if g_size != self.synthetic_size else ""
            mix = "no real images" if self.synthetic_only else f"beside {t.rank_batch_size} real ones"
            t.log(f"synthetic: {n} generated images per step (ratio {r:g}) from {path} ({model}, {loaded.weights}); "
                  f"{mix}{resized}; {trained}")
            return
        # A pool drawn once (a diffusion model costs dozens of network evaluations per image), labels with the real
        # training split's class frequencies, seeded by train.seed: the same pool on resume.
        size = cfg.data.synthetic_pool or int(counts.sum())
        per_class = class_counts(size, counts.tolist())
        t.log(f"synthetic: drawing a pool of {size} images from {path} ({model}, {loaded.weights}; "
              f"{', '.join(f'{c} {k}' for c, k in zip(classes, per_class))}) once; {trained}")
        started = time.perf_counter()
        images, labels = loaded.draw(per_class, seed=cfg.train.seed + 7, device=dev)
        self.synthetic_source["pool"] = size
        self._set_pool(images, labels, f"a pool of {size} images from {model}, drawn in "
                                       f"{time.perf_counter() - started:.0f} s")

    def _set_pool(self, images: torch.Tensor, labels: torch.Tensor, desc: str) -> None:
        """Keep ``images`` (uint8, resized to the classifier's side) and ``labels`` on the device; each step takes
        ``n_synthetic`` of them at random (with replacement, from ``synthetic_gen``)."""
        t, dev = self.trainer, self.device
        resized = ""
        if images.shape[-1] != self.synthetic_size:
            resized = f", resized {images.shape[-1]} -> {self.synthetic_size} px"
            images = resize_u8(images, self.synthetic_size)
        self.pool, self.pool_labels = images.to(dev), labels.to(dev)
        mix = torch.bincount(labels, minlength=len(t.data.classes)).tolist()
        where = "no real images" if self.synthetic_only else f"beside {t.rank_batch_size} real ones"
        t.log(f"synthetic: {self.n_synthetic} images per step (ratio {self.cfg.data.synthetic_ratio:g}) from {desc} "
              f"({', '.join(f'{c} {k}' for c, k in zip(t.data.classes, mix))}); {where}{resized}")

    @classmethod
    def graphs_unsupported(cls, cfg) -> str:
        why = super().graphs_unsupported(cfg)
        if why:
            return why
        if cfg.data.synthetic:
            return ("data.synthetic: generating the synthetic images inside a captured step is untested on a GPU, "
                    "so such runs train eagerly")
        return ""

    # ------------------------------------------------------------ state
    def generators(self) -> dict[str, tuple[torch.Generator, int]]:
        gens = {"aug": (self.aug_gen, 3)}
        if self.n_synthetic:
            gens["synthetic"] = (self.synthetic_gen, 5)
        return gens

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"class_weights": None if self.class_weights is None else self.class_weights.cpu()}
        if self.n_synthetic:
            state["synthetic"] = dict(self.synthetic_source)
        return state

    def load_extra_state(self, ckpt: dict[str, Any]) -> None:
        if not self.n_synthetic:
            return
        then, now = ckpt.get("synthetic") or {}, self.synthetic_source
        keys = ("path", "step", "weights")
        if any(then.get(k) != now[k] for k in keys):
            was = ", ".join(f"{k} {then.get(k, '?')}" for k in keys)
            msg = (f"the generator of data.synthetic changed since {ckpt['path']} was written ({was} then; "
                   f"{', '.join(f'{k} {now[k]}' for k in keys)} now): the resumed run is not bit-exact")
            warnings.warn(msg, stacklevel=2)
            self.trainer.log(f"note: {msg}")

    def divergence_hint(self) -> str:
        amp = "--set train.amp=off (full precision), " if self.trainer.amp_dtype is not None else ""
        return (f"Try {amp}a lower learning rate (optim.lr), a longer warm-up (optim.warmup_epochs), or resume "
                f"from the last checkpoint")

    # ------------------------------------------------------------ step
    @torch.no_grad()
    def synthetic_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's generated images (uint8, at the classifier's side) and their labels, on the device."""
        n, dev = self.n_synthetic, self.device
        if self.pool is not None:
            pick = torch.randint(len(self.pool), (n,), generator=self.synthetic_gen, device=dev)
            return self.pool[pick], self.pool_labels[pick]
        y = sample_labels(self.synthetic_cdf, n, self.synthetic_gen)
        z = torch.randn(n, self.latent_dim, generator=self.synthetic_gen, device=dev)
        images = to_uint8(self.G(z, y))
        if images.shape[-1] != self.synthetic_size:
            images = resize_u8(images, self.synthetic_size)
        return images, y

    def device_step(self, images_u8: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The device work of one step (no host syncs, so that it can be captured as a CUDA graph)."""
        if self.n_synthetic:
            fake, fake_labels = self.synthetic_batch()
            if self.synthetic_only:
                images_u8, labels = fake, fake_labels
            else:
                images_u8 = torch.cat([images_u8, fake.contiguous()])
                labels = torch.cat([labels, fake_labels])
        x = augment_batch(to_float(images_u8), self.aug_gen, **self.aug_kw)
        x = x.contiguous(memory_format=self.trainer.memory_format)
        with self.autocast():
            logits = self.net_train(x)
        loss = F.cross_entropy(logits.float(), labels, weight=self.class_weights,
                               label_smoothing=self.cfg.loss.label_smoothing)
        self.optimizer_step(loss)
        return {"loss": loss.detach(), "acc": (logits.detach().argmax(1) == labels).float().mean(),
                "lr": lr_stat(self.opt)}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_outputs(self, data) -> dict[str, torch.Tensor]:
        mc = self.cfg.eval.mc_samples if self.cfg.model.mc_dropout > 0 else 1
        out = predict_probs(self.net, data.images, self.device, self.cfg.eval.batch_size, mc,
                            self.trainer.amp_dtype, self.trainer.memory_format)
        rows = {"probs": out["probs"].cpu(), "labels": data.labels.cpu()}
        if mc > 1:
            rows["entropy"] = out["entropy"].cpu()
        return rows

    def evaluate_metrics(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        rep = M.classification_report(outputs["labels"], outputs["probs"], list(self.trainer.data.classes))
        values = {"loss": rep["nll"], **{k: rep[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}}
        if rep["auc"] is not None:
            values["auc"] = rep["auc"]
        elif self.trainer.metric_name == "auc":
            raise CovidXrayError(f"eval.metric=auc: {rep['auc_error']}", "Choose another eval.metric (e.g. loss)")
        if "entropy" in outputs:  # MC dropout
            values["entropy"] = float(outputs["entropy"].mean())
        return values
