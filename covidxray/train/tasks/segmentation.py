"""The segmentation task: Dice + BCE on paired, augmented image/mask batches; validation Dice/IoU every epoch.

Only images with a lung mask are trained on (the loop loads them with their masks, uint8 0/1 beside the
images, on the GPU when there is one) and the step gets the batch's masks instead of class labels. One
step: the uint8 batch becomes float in [-1, 1]; image and mask get **one shared** random affine warp
(rotation, zoom, shift; optionally an elastic deformation) on the device, the image bilinearly, the mask
bilinearly then thresholded at 0.5, so they stay aligned (:func:`~covidxray.data.transforms.augment_pair`);
brightness/contrast jitter touches the image only. The network gives one logit map; the loss is
``loss.bce_weight * BCE(logits, mask) + loss.dice_weight * (1 - soft Dice)`` with the soft Dice of the
sigmoid computed per image and averaged over the batch (so that every image weighs the same whatever its
lung area). The learning rate follows ``optim.schedule`` per step, as for the classifiers. Soft Dice and
BCE are written here (six lines) rather than taken from MONAI's ``DiceCELoss``: importing MONAI costs
seconds per command, and the two formulas are the textbook ones.

Validation (:meth:`SegmentationTask.evaluate`) thresholds the sigmoid at ``eval.threshold`` and reports the
mean over images of Dice and IoU (an image whose mask and prediction are both empty scores 1, one empty
scores 0: never NaN) and the mean loss; ``best.pt`` is kept by ``eval.metric`` (default: Dice, higher is
better). The distance metrics (HD95, ASD) and post-processing are ``covidxray evaluate``'s.

Every ``train.snapshot_every`` epochs ``samples/epoch_XXXX.png`` shows the predicted outlines on up to 16
fixed validation images (so ``covidxray gif RUN`` shows the masks learning).

Checkpoint entries it adds: ``models`` ``net``; ``optimizers``/``scalers`` ``net``; ``rng`` ``aug``; ``fit``
(``prepare``'s ``--fit`` of the training data: ``covidxray segment`` fits new X-rays the same way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from covidxray.data.datasets import read_prepared_info, to_float
from covidxray.data.overlays import outline_grid
from covidxray.data.transforms import augment_pair
from covidxray.errors import CovidXrayError
from covidxray.infer.predict import iter_mask_probs
from covidxray.train.optim import lr_stat
from covidxray.train.tasks.supervised import SupervisedTask

#: Validation images shown in each snapshot.
SNAPSHOT_IMAGES = 16


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over images of ``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)``, p the sigmoid of ``logits``
    (N x 1 x H x W), ``target`` 0/1; ``eps = 1`` (one pixel) keeps empty masks finite."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def hard_scores(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU (N,) of boolean masks on the device; both empty: 1, one empty: 0."""
    p, t = pred.flatten(1), target.flatten(1).bool()
    inter = (p & t).sum(1).float()
    total = p.sum(1).float() + t.sum(1).float()
    union = total - inter
    dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return dice, iou


class SegmentationTask(SupervisedTask):
    """Trains a registered segmenter (the ``segmentation`` family); see the module docstring."""

    family = "segmentation"
    resizes_data = True
    evaluates = True
    shards_evaluation = True  # under torchrun each rank scores its shard of the validation split
    needs_masks = True
    batch_fields = ("masks",)
    progress_keys = ("loss", "dice", "lr")
    bf16_on_native_cpu = True

    def __init__(self, trainer):
        super().__init__(trainer)
        cfg, spec, dev = self.cfg, trainer.spec, self.device
        size = trainer.data_spec.image_size
        side = 2 ** cfg.arch.depth
        if size % side or size < spec.min_image_size:
            fit = max(size // side, -(-spec.min_image_size // side), 1) * side
            raise CovidXrayError(f"{spec.name} with arch.depth={cfg.arch.depth} needs a side that is a multiple of "
                                 f"{side} and at least {spec.min_image_size} px; the data are {size} px",
                                 f"Pass --image-size {fit} (resized on the device) or a smaller arch.depth")
        self.setup_net(spec.build(cfg, trainer.data_spec)["net"])
        # How `prepare` fitted the X-rays into squares: `segment` fits a user's X-rays the same way.
        self.fit = str(read_prepared_info(cfg.data.path).get("fit", "stretch"))
        self.aug_gen = torch.Generator(device=dev).manual_seed(cfg.train.seed + 3)
        a = cfg.aug
        self.aug_kw = dict(rotate=a.rotate, scale=a.scale, translate=a.translate, brightness=a.brightness,
                           contrast=a.contrast, elastic=a.elastic, hflip=a.hflip)

    # ------------------------------------------------------------ state
    def generators(self) -> dict[str, tuple[torch.Generator, int]]:
        return {"aug": (self.aug_gen, 3)}

    def extra_state(self) -> dict:
        return {"fit": self.fit}

    def divergence_hint(self) -> str:
        amp = "--set train.amp=off (full precision), " if self.trainer.amp_dtype is not None else ""
        return f"Try {amp}a lower learning rate (optim.lr), or resume from the last checkpoint"

    # ------------------------------------------------------------ step
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``bce_weight * BCE + dice_weight * soft Dice loss`` (module docstring)."""
        lw = self.cfg.loss
        logits = logits.float()
        loss = logits.new_zeros(())
        if lw.bce_weight:
            loss = loss + lw.bce_weight * F.binary_cross_entropy_with_logits(logits, target)
        if lw.dice_weight:
            loss = loss + lw.dice_weight * soft_dice_loss(logits, target)
        return loss

    def device_step(self, images_u8: torch.Tensor, masks_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        """The device work of one step (no host syncs, so that it can be captured as a CUDA graph)."""
        x, m = augment_pair(to_float(images_u8), masks_u8, self.aug_gen, **self.aug_kw)
        x = x.contiguous(memory_format=self.trainer.memory_format)
        with self.autocast():
            logits = self.net_train(x)
        loss = self.loss(logits, m)
        self.optimizer_step(loss)
        dice, _ = hard_scores(logits.detach() > 0, m)
        return {"loss": loss.detach(), "dice": dice.mean(), "lr": lr_stat(self.opt)}

    # ------------------------------------------------------------ evaluation
    def _probs(self, images_u8: torch.Tensor):
        t = self.trainer
        return iter_mask_probs(self.net, images_u8, self.device, self.cfg.eval.batch_size, t.amp_dtype,
                               t.memory_format)

    @torch.no_grad()
    def evaluate_outputs(self, data) -> dict[str, torch.Tensor]:
        thr = self.cfg.eval.threshold
        dices, ious, losses = [], [], []
        for i, probs in self._probs(data.images):
            target = data.masks[i:i + probs.shape[0]].to(self.device)
            dice, iou = hard_scores(probs > thr, target)
            dices.append(dice)
            ious.append(iou)
            logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
            # the batch's loss on each of its rows: their sum is the sum of the per-image losses (BCE is a
            # pixel mean over equal-sized images and the soft Dice a mean over images)
            losses.append(self.loss(logits, target.float()).expand(probs.shape[0]))
        return {"dice": torch.cat(dices).cpu(), "iou": torch.cat(ious).cpu(), "loss": torch.cat(losses).float().cpu()}

    def evaluate_metrics(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"dice": float(outputs["dice"].mean()), "iou": float(outputs["iou"].mean()),
                "loss": float(outputs["loss"].mean())}

    @torch.no_grad()
    def snapshot(self) -> None:
        data = self.trainer.eval_data if self.trainer.eval_data is not None else self.trainer.data
        images = data.images[:SNAPSHOT_IMAGES]
        preds = torch.cat([p > self.cfg.eval.threshold for _, p in self._probs(images)])
        outline_grid(images.cpu(), preds.cpu(), data.masks[:SNAPSHOT_IMAGES].cpu(),
                     self.trainer.run_dir / "samples" / f"epoch_{self.trainer.epoch:04d}.png")
