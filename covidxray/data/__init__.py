"""Data: source layouts, ``prepare`` (split + resize), datasets and demo phantoms."""

#: Canonical class names used everywhere after ``prepare``.
CANONICAL_CLASSES = ("covid", "normal", "viral_pneumonia", "lung_opacity")
