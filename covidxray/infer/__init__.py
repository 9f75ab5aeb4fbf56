"""After training: load a trained model and use it (sample, predict, segment, reconstruct, translate, animate).

This layer sits below ``train/`` and ``evaluate/`` and above ``models/``, ``metrics/`` and ``data/``: the
training tasks use it for their snapshots and validation, the commands and the evaluation for everything a
trained model does. It never imports ``train/``. See docs/architecture.md.
"""
