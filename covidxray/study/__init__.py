"""``covidxray study``: several generators trained and scored under one protocol, and one report.

A study spec (``configs/studies/*.yaml``, :mod:`covidxray.study.spec`) names arms - a model, its overrides, a
budget in kimg, a seed - and the evaluation protocol they share. :mod:`covidxray.study.run` trains every arm
through the one training loop and scores it through the one generator evaluation at several points of its
budget, recording each stage in a manifest (``study.json``) so that a rerun continues where it stopped;
:mod:`covidxray.study.report` writes ``study.md`` from the manifest, with the figures of
:mod:`covidxray.study.figures` (quality-per-compute curves, the downstream forest plot, sample grids) and the
environment the study ran in.

The layer sits between ``cli`` and ``evaluate``: it uses ``evaluate`` and ``train`` as they are and computes
nothing a second way.
"""
