"""The built-in dataset: the UCI handwritten digits (1,797 8×8 images, 10 classes) that
scikit-learn ships, turned into domains by deterministic transforms.

Each sample belongs to exactly one domain. Domains are assigned by a fixed permutation (its own
generator, seed 2411_02115, independent of any user seed), so every install sees the same bytes and
the dataset fingerprint is stable.

- ``digits-rot``: rotations by 0°, 90°, 180°, 270° (the rotated-digits setting of FL papers).
- ``digits-style``: clean, inverted (1 − x), noisy (Gaussian σ = 0.25, clipped), blurred (3×3 box).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from fedmoe.data.base import Dataset
from fedmoe.errors import InputError

_DOMAIN_SEED = 241102115
_CLASS_NAMES = tuple(str(i) for i in range(10))


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """Pixels (1797, 8, 8) in [0, 16] and labels, read from scikit-learn's packaged CSV."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the built-in digits need scikit-learn, which is not installed",
            hint="pip install scikit-learn",
        )
    csv = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():  # read the file directly: importing sklearn costs about a second
        with gzip.open(csv, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float64)
        pixels, labels = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - layout of a future scikit-learn
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, labels = bunch.data, bunch.target
    return pixels.reshape(-1, 8, 8), labels.astype(np.int64)


def _domains(n: int, num_domains: int) -> np.ndarray:
    """Balanced domain ids: a fixed permutation of 0..n-1, taken modulo ``num_domains``."""
    order = np.random.default_rng(_DOMAIN_SEED).permutation(n)
    domain = np.empty(n, dtype=np.int64)
    domain[order] = np.arange(n) % num_domains
    return domain


def digits_rot() -> Dataset:
    """UCI digits with each image rotated by 90°·d for its domain d ∈ {0, 1, 2, 3}."""
    pixels, labels = _raw_digits()
    images = pixels / 16.0  # (n, 8, 8)
    domain = _domains(len(labels), 4)
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


def digits_style() -> Dataset:
    """UCI digits in four image styles: clean, inverted, Gaussian noise, 3×3 box blur."""
    pixels, labels = _raw_digits()
    images = pixels / 16.0  # (n, 8, 8)
    domain = _domains(len(labels), 4)
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
