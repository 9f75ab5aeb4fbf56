"""The image-to-image task (``pix2pix``; ``model.task`` mask2xray or colorize): L1 + conditional adversarial loss.

``colorize`` swaps the roles: the condition is the X-ray and the target its pseudo-colour rendering
(:func:`colorize_target`: lungs, rest of the body, background, each pixel's gray value in its region's colour),
so the same network shows a colorization target; the rest of this docstring is written for mask2xray.

Trains on the images that have a lung mask (the loop gives the batch's masks, as for the segmenters). One
step: the uint8 X-rays become float in [-1, 1]; X-ray and mask get one shared random warp on the device
(:func:`~covidxray.data.transforms.augment_pair`, ``aug.*``; a generator saved with the run); the condition is
the mask in [-1, 1]. D (a PatchGAN on the condition and an image) takes one Adam step on the mean of its
losses on (c, x) and (c, G(c)); then G takes one Adam step on ``adversarial + loss.l1_weight * L1(G(c), x)``
(Isola et al. 2017). G's dropout draws from the default generator, whose state the loop saves, so a resumed
run is exact.

Validation (every ``eval.every`` epochs): the mean absolute error of G(c) against the real X-ray over the
split's masked images (images in [0, 1], G in eval mode except its dropout, as at sampling), which picks
``best.pt``. A class-conditional run (``model.class_maps`` on data of two or more classes) gives G and D the
class of each image as constant maps beside the mask (:func:`covidxray.models.pix2pix.condition`); the loop hands
the step the batch's masks and labels. Snapshots (``samples/epoch_XXXX.png``, for ``covidxray gif``): ``train.grid_size`` fixed validation
masks in the first row, G's X-rays from them in the second, the real X-rays in the third.

Checkpoint entries it adds: ``models`` ``G``, ``D``; ``optimizers``/``scalers`` ``G``, ``D``; ``rng`` ``aug``.
"""

from __future__ import annotations

import torch

from covidxray.data.datasets import to_float, to_uint8
from covidxray.data.grids import save_grid
from covidxray.data.overlays import save_rgb
from covidxray.data.transforms import augment_pair
from covidxray.models.pix2pix import condition, sampling_mode, uses_class_maps
from covidxray.train import gan_losses as losses
from covidxray.train.tasks.base import Task


#: Colours (RGB in [0, 1]) of the colorize target: lungs, the rest of the body, background.
LUNG_RGB, BODY_RGB = (1.0, 0.45, 0.35), (0.35, 0.75, 1.0)
#: A pixel outside the lungs is body when its X-ray intensity (in [0, 1]) is above this.
BODY_LEVEL = 0.15


def colorize_target(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The colorize task's target (N x 3 x H x W in [-1, 1]) of X-rays ``x`` (N x 1, in [-1, 1]) and their 0/1 lung
    masks: each pixel's gray value (in [0, 1]) times the colour of its region - lungs (the mask), the rest of the
    body (outside the mask, brighter than :data:`BODY_LEVEL`) or background (black). A rendering of the anatomy
    the masks and a threshold define, not a physical or clinical colour."""
    v = (x.float() + 1) / 2
    lung = masks.float()
    body = (1 - lung) * (v > BODY_LEVEL).float()
    colours = [lung * c1 + body * c2 for c1, c2 in zip(LUNG_RGB, BODY_RGB)]
    return torch.cat([v * c for c in colours], 1) * 2 - 1


class Image2ImageTask(Task):
    """Trains a registered image-to-image model (the ``image2image`` family); see the module docstring."""

    family = "image2image"
    train_forwards = (("G_train", "G"), ("D_train", "D"))
    resizes_data = True
    evaluates = True
    needs_masks = True
    batch_fields = ("masks", "labels")
    # Measured (configs/studies/precision.yaml, docs/benchmarks.md "Precision on the CPU"): pix2pix at 64 px trains
    # 1.33x faster in bf16 on a 2-core CPU with native bf16, to the same FID and validation L1 at equal kimg.
    bf16_on_native_cpu = True
    cpu_precision_before_record = "off"  # fp32 on every CPU before that measurement
    progress_keys = ("loss_d", "loss_g", "l1")

    def __init__(self, trainer):
        super().__init__(trainer)
        cfg, spec, dev = self.cfg, trainer.spec, self.device
        self.setup_pair(spec.build(cfg, trainer.data_spec))
        self.colorize = cfg.model.task == "colorize"
        n = trainer.data_spec.n_classes
        self.n_class_maps = n if uses_class_maps(cfg, n) else 0  # 0: unconditional
        self.aug_gen = torch.Generator(device=dev).manual_seed(cfg.train.seed + 3)
        a = cfg.aug
        self.aug_kw = dict(rotate=a.rotate, scale=a.scale, translate=a.translate)

    def generators(self) -> dict[str, tuple[torch.Generator, int]]:
        return {"aug": (self.aug_gen, 3)}

    def divergence_hint(self) -> str:
        amp = "--set train.amp=off (full precision), " if self.trainer.amp_dtype is not None else ""
        return f"Try {amp}lower learning rates (optim.lr_g, optim.lr_d), or resume from the last checkpoint"

    def condition(self, masks: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The mask2xray condition: the 0/1 mask as an image in [-1, 1] (+ the class maps of a conditional run)."""
        return condition(masks, labels, self.n_class_maps)

    def device_step(self, images_u8: torch.Tensor, masks_u8: torch.Tensor,
                    labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The device work of one step (no host syncs)."""
        kind, fmt = self.cfg.loss.gan, self.trainer.memory_format
        x, m = augment_pair(to_float(images_u8), masks_u8, self.aug_gen, **self.aug_kw)
        if self.colorize:  # X-ray -> its pseudo-colour rendering
            c, x = x, colorize_target(x, m)
        else:  # mask (+ class) -> X-ray
            c = self.condition(m, labels)
        x = x.contiguous(memory_format=fmt)
        c = c.contiguous(memory_format=fmt)
        with self.autocast():
            fake = self.G_train(c)
            d_real, d_fake = self.D_train(c, x), self.D_train(c, fake.detach())
        loss_d = 0.5 * losses.d_loss(kind, d_real.float(), d_fake.float())
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler_d.scale(loss_d).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        with self.autocast():
            g_logits = self.D_train(c, fake)
        l1 = (fake.float() - x).abs().mean()
        loss_g = losses.g_loss(kind, g_logits.float()) + self.cfg.loss.l1_weight * l1
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(loss_g).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "l1": l1.detach() / 2}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def translate(self, inputs_u8: torch.Tensor, labels: torch.Tensor | None = None,
                  batch_size: int | None = None) -> torch.Tensor:
        """G's outputs (uint8 N x C x S x S, on the CPU), G in sampling mode (dropout on): X-rays from 0/1 masks
        (mask2xray; of the classes ``labels`` in a conditional run), or renderings from uint8 X-rays (colorize)."""
        was = self.G.training
        sampling_mode(self.G)
        bs = batch_size or self.cfg.eval.batch_size
        out = []
        try:
            for i in range(0, inputs_u8.shape[0], bs):
                chunk = inputs_u8[i:i + bs].to(self.device)
                y = None if labels is None else labels[i:i + bs].to(self.device)
                c = to_float(chunk) if self.colorize else self.condition(chunk, y)
                with self.autocast():
                    out.append(to_uint8(self.G(c)).cpu())
        finally:
            self.G.train(was)
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, data) -> dict[str, float]:
        if self.colorize:
            fake = self.translate(data.images).float() / 255
            real = (colorize_target(to_float(data.images.cpu()), data.masks.cpu()) + 1) / 2
            real = (real * 255).round() / 255  # as uint8, like G's output
        else:
            fake = self.translate(data.masks, data.labels).float() / 255
            real = data.images.cpu().float() / 255
        return {"l1": float((fake - real).abs().mean())}

    @torch.no_grad()
    def snapshot(self) -> None:
        t = self.trainer
        data = t.eval_data if t.eval_data is not None else t.data
        n = min(self.cfg.train.grid_size, len(data))
        masks, images, labels = data.masks[:n].cpu(), data.images[:n].cpu(), data.labels[:n].cpu()
        path = t.run_dir / "samples" / f"epoch_{t.epoch:04d}.png"
        if self.colorize:  # rows: X-ray, G's rendering, the target
            from torchvision.utils import make_grid  # local: torchvision (~1 s) would slow every training start

            target = to_uint8(colorize_target(to_float(images), masks))
            grid = torch.cat([images.expand(-1, 3, -1, -1), self.translate(images), target])
            save_rgb(make_grid(grid, nrow=n, padding=2).permute(1, 2, 0).numpy(), path)
            return
        grid = torch.cat([masks * 255, self.translate(masks, labels), images])
        save_grid(grid, path, nrow=n)
