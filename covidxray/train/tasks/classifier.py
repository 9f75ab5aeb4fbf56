"""The classifier task: cross-entropy on augmented batches, validation metrics every ``eval.every`` epochs.

One step: the uint8 batch (already on the device) becomes float in [-1, 1], gets a random affine warp
and brightness/contrast jitter on the device (:mod:`covidxray.train.augment`, drawn from a generator
saved with the run), goes through the network under the run's precision, and one optimizer step
follows on the cross-entropy (optional class weights and label smoothing). The learning rate follows
``optim.schedule`` per step (linear warm-up, then cosine or step), set on the host before the step;
with CUDA graphs it lives in a device tensor that the captured AdamW update reads.

Validation (:meth:`ClassifierTask.evaluate`) reports loss (the mean negative log-likelihood of the
true class), accuracy, balanced accuracy, macro-F1 and, when every class has images in the split,
one-vs-rest ROC-AUC; with ``model.mc_dropout`` the prediction is the mean over ``eval.mc_samples``
dropout passes. The loop keeps ``best.pt`` by ``eval.metric`` (default: loss) and stops early after
``eval.patience`` validations without improvement, as the seed project did.

Checkpoint entries it adds: ``models`` ``net``; ``optimizers``/``scalers`` ``net``; ``rng`` ``aug``;
``class_weights``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from covidxray.config.classifier import parse_class_weights
from covidxray.data.datasets import to_float
from covidxray.errors import CovidXrayError
from covidxray.metrics import classification as M
from covidxray.models.classifiers import load_pretrained
from covidxray.predict import predict_probs
from covidxray.train.augment import augment_batch
from covidxray.train.optim import schedule_factor
from covidxray.train.tasks.base import Task


class ClassifierTask(Task):
    """Trains a registered classifier (``family == "classifier"``); see the module docstring."""

    family = "classifier"
    resizes_data = True
    evaluates = True
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

        self.net = spec.build(cfg, trainer.data_spec)["net"].to(dev, memory_format=trainer.memory_format)
        self.net_train = self.net
        self.models = {"net": self.net}
        if cfg.model.pretrained and getattr(trainer, "resuming", False) is False:
            loaded = load_pretrained(self.net, cfg.model.pretrained)
            trainer.log(f"pretrained: {loaded['loaded']} tensors from {cfg.model.pretrained} (first layer summed "
                        f"to 1 channel; {loaded['skipped_head']} head tensors left out, the head starts fresh)")

        o = cfg.optim
        self.use_tensor_lr = trainer.use_graphs and o.name == "adamw"
        lr: Any = torch.tensor(o.lr, device=dev) if self.use_tensor_lr else o.lr
        if o.name == "adamw":
            kw: dict[str, Any] = {"fused": True} if dev.type == "cuda" else {}
            if self.use_tensor_lr:
                kw["capturable"] = True  # step counters and lr on the GPU: the update can be captured
            self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, betas=(o.beta1, o.beta2),
                                         weight_decay=o.weight_decay, **kw)
        else:
            self.opt = torch.optim.SGD(self.net.parameters(), lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                                       weight_decay=o.weight_decay)
        self.optimizers = {"net": self.opt}
        self.scaler = torch.amp.GradScaler("cuda", enabled=trainer.amp_dtype == torch.float16)
        self.scalers = {"net": self.scaler}

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

    @classmethod
    def graphs_unsupported(cls, cfg) -> str:
        # SGD keeps its learning rate as a host float, which a captured update would freeze.
        if cfg.optim.name == "sgd":
            return "optim.name=sgd keeps its learning rate on the host, so its update cannot be captured (use adamw)"
        return ""

    # ------------------------------------------------------------ compile
    def compile(self, mode: str) -> None:
        self.net_train = torch.compile(self.net, mode=mode)
        self.compiled = True

    def uncompile(self) -> None:
        self.net_train = self.net
        self.compiled = False

    # ------------------------------------------------------------ state
    def generators(self) -> dict[str, tuple[torch.Generator, int]]:
        return {"aug": (self.aug_gen, 3)}

    def extra_state(self) -> dict[str, Any]:
        return {"class_weights": None if self.class_weights is None else self.class_weights.cpu()}

    def divergence_hint(self) -> str:
        amp = "--set train.amp=off (full precision), " if self.trainer.amp_dtype is not None else ""
        return (f"Try {amp}a lower learning rate (optim.lr), a longer warm-up (optim.warmup_epochs), or resume "
                f"from the last checkpoint")

    # ------------------------------------------------------------ step
    def current_lr(self) -> float:
        t, o = self.trainer, self.cfg.optim
        epoch_float = t.state.step / max(t.batches_per_epoch, 1)
        return o.lr * schedule_factor(o.schedule, epoch_float, self.cfg.train.epochs, o.warmup_epochs,
                                      o.step_epochs, o.step_gamma)

    def step_variant(self) -> tuple:
        # Not a graph key: the learning rate of this step is written where the update reads it.
        lr = self.current_lr()
        for group in self.opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return ()

    def device_step(self, images_u8: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The device work of one step (no host syncs, so that it can be captured as a CUDA graph)."""
        x = augment_batch(to_float(images_u8), self.aug_gen, **self.aug_kw)
        x = x.contiguous(memory_format=self.trainer.memory_format)
        with self.autocast():
            logits = self.net_train(x)
        loss = F.cross_entropy(logits.float(), labels, weight=self.class_weights,
                               label_smoothing=self.cfg.loss.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        lr = self.opt.param_groups[0]["lr"]
        stats = {"loss": loss.detach(), "acc": (logits.detach().argmax(1) == labels).float().mean()}
        # (a host float stays on the CPU: no host-to-device copy per step)
        stats["lr"] = lr.detach().clone() if torch.is_tensor(lr) else torch.tensor(float(lr))
        return stats

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data) -> dict[str, float]:
        mc = self.cfg.eval.mc_samples if self.cfg.model.mc_dropout > 0 else 1
        out = predict_probs(self.net, data.images, self.device, self.cfg.eval.batch_size, mc,
                            self.trainer.amp_dtype, self.trainer.memory_format)
        rep = M.classification_report(data.labels.cpu(), out["probs"], data.classes)
        values = {"loss": rep["nll"], **{k: rep[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}}
        if rep["auc"] is not None:
            values["auc"] = rep["auc"]
        elif self.trainer.metric_name == "auc":
            raise CovidXrayError(f"eval.metric=auc: {rep['auc_error']}", "Choose another eval.metric (e.g. loss)")
        if mc > 1:
            values["entropy"] = float(out["entropy"].mean())
        return values
