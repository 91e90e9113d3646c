"""Shared building blocks of the roadseg scripts: labels, data, selection, modeling, training, metrics."""

__version__ = "0.1.0"
