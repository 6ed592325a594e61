"""The built-in dataset's transforms: the UCI handwritten digits (1,797 8×8 images, 10 classes)
turned into domains by deterministic transforms.

The raw pixels and labels come from scikit-learn's packaged copy, read by
:func:`fedmoe.io.datasets.raw_digits`; the functions here are pure: raw arrays in, a
:class:`~fedmoe.data.base.Dataset` out.

Each sample belongs to exactly one domain. Domains are assigned by a fixed permutation (its own
generator, seed 2411_02115, independent of any user seed), so every install sees the same bytes and
the dataset fingerprint is stable.

- ``digits-rot``: rotations by 0°, 90°, 180°, 270° (the rotated-digits setting of FL papers).
- ``digits-style``: clean, inverted (1 − x), noisy (Gaussian σ = 0.25, clipped), blurred (3×3 box).
"""

from __future__ import annotations

import numpy as np

from fedmoe.data.base import Dataset

_DOMAIN_SEED = 241102115
_CLASS_NAMES = tuple(str(i) for i in range(10))


def balanced_domains(n: int, num_domains: int) -> np.ndarray:
    """Balanced domain ids: a fixed permutation of 0..n-1 (seed 2411_02115), taken modulo
    ``num_domains``."""
    order = np.random.default_rng(_DOMAIN_SEED).permutation(n)
    domain = np.empty(n, dtype=np.int64)
    domain[order] = np.arange(n) % num_domains
    return domain


def digits_rot(pixels: np.ndarray, labels: np.ndarray) -> Dataset:
    """UCI digits with each image rotated by 90°·d for its domain d ∈ {0, 1, 2, 3}.

    Parameters
    ----------
    pixels
        (n, 8, 8) raw intensities in [0, 16].
    labels
        (n,) int64 digit labels 0..9.

    Returns
    -------
    Dataset
        ``digits-rot``: x (n, 1, 8, 8) float32 in [0, 1], four balanced domains.
    """
    images = pixels / 16.0  # (n, 8, 8)
    domain = balanced_domains(len(labels), 4)
    out = np.empty_like(images)
    for d in range(4):
        sel = domain == d
        out[sel] = np.rot90(images[sel], k=d, axes=(1, 2))
    return Dataset(
        name="digits-rot",
        x=out[:, None].astype(np.float32),  # (n, 1, 8, 8)
        y=labels,
        domain=domain,
        class_names=_CLASS_NAMES,
        domain_names=("rot0", "rot90", "rot180", "rot270"),
    )


def digits_style(pixels: np.ndarray, labels: np.ndarray) -> Dataset:
    """UCI digits in four image styles: clean, inverted, Gaussian noise, 3×3 box blur.

    Parameters
    ----------
    pixels
        (n, 8, 8) raw intensities in [0, 16].
    labels
        (n,) int64 digit labels 0..9.

    Returns
    -------
    Dataset
        ``digits-style``: x (n, 1, 8, 8) float32 in [0, 1], four balanced domains.
    """
    images = pixels / 16.0  # (n, 8, 8)
    domain = balanced_domains(len(labels), 4)
    noise = np.random.default_rng(_DOMAIN_SEED + 1).normal(0.0, 0.25, size=images.shape)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), mode="edge")
    blurred = np.zeros_like(images)
    for i in range(3):
        for j in range(3):
            blurred += padded[:, i : i + 8, j : j + 8] / 9.0
    styles = np.stack([images, 1.0 - images, np.clip(images + noise, 0.0, 1.0), blurred])
    out: np.ndarray = np.take_along_axis(styles, domain[None, :, None, None], axis=0)[0]
    return Dataset(
        name="digits-style",
        x=out[:, None].astype(np.float32),  # (n, 1, 8, 8)
        y=labels,
        domain=domain,
        class_names=_CLASS_NAMES,
        domain_names=("clean", "inverted", "noisy", "blurred"),
    )
