"""covidxray: synthetic chest X-ray generation, lung segmentation and evaluation.

The package is organised as the architecture: ``cli`` (one module per command),
``data`` (layouts, prepare, datasets, demo phantoms), ``models`` (one file per
family, each registered), ``train`` (loops, checkpoints) and ``metrics``.
"""

__version__ = "0.1.0"
