"""Training: the one loop (:mod:`covidxray.train.loop`), the per-family tasks (:mod:`covidxray.train.tasks`),
whole-step CUDA graphs, EMA, augmentation and the GAN-only losses."""
