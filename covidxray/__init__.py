"""covidxray: synthetic chest X-ray generation, lung segmentation and evaluation.

The package is organised as the architecture: ``cli`` (one module per command),
``data`` (layouts, prepare, datasets, demo phantoms, image I/O), ``models`` (one file
per family, each registered), ``train`` (the one loop and a task per family),
``evaluate`` (scoring trained models) and ``metrics`` (pure functions). Neutral
modules below them: ``config``, ``checkpoint``, ``generate`` (sampling GANs),
``predict`` (classifier inference), ``utils``, ``errors``.
"""

__version__ = "0.2.0"
