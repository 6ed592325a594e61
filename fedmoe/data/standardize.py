"""Feature standardisation: each feature z-scored with its mean and standard deviation.

The statistics are computed over every sample of the dataset, before it is split: the global test
set and the clients' local test splits count too. That is what most federated-learning baselines
do (the data are standardised once, then partitioned), and it lets every later command re-read the
data the same way from the file alone. It is a mild leak (two numbers per feature, no labels) and a
centralised step a real federation could not take without pooling statistics; users who need
train-only statistics should standardise their file before ``fedmoe partition``.
"""

from __future__ import annotations

import numpy as np

from fedmoe.data.base import Dataset

_EPS = 1e-12  # a standard deviation at or below this is a constant feature


def feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and population standard deviation of ``x`` (n, ...), in float64; the
    standard deviation of a constant feature is given as 1, so dividing by it changes nothing."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)  # (*input_shape)
    std = x64.std(axis=0)  # (*input_shape)
    return mean, np.where(std > _EPS, std, 1.0)


def standardized(data: Dataset) -> Dataset:
    """``data`` with every feature shifted to mean 0 and scaled to standard deviation 1 over all
    its samples (a constant feature becomes 0); labels, domains and names are kept."""
    mean, std = feature_stats(data.x)
    x = ((data.x.astype(np.float64) - mean) / std).astype(np.float32)
    return Dataset(
        data.name, x, data.y, data.domain, data.class_names, data.domain_names, data.has_domains
    )
