"""Evaluation of trained models: :mod:`covidxray.evaluate.classifier` (metrics, predictions and a confusion
matrix of a classifier on a split). Generators get FID/KID and friends with the evaluate issue."""
