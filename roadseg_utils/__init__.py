"""Shared building blocks of the roadseg scripts: labels, data, selection, modeling, training, metrics."""

import os

# albumentations checks PyPI for a newer release on import; offline (Kaggle, CI) that only costs time and noise.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
