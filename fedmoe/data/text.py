"""Text as data for a byte-level language model: fixed-length windows of bytes, each from one
domain.

A sample is ``WINDOW + 1`` consecutive bytes of one domain's text (the model reads the first
``WINDOW`` and predicts each next byte), stored as float32 values 0..255 in ``Dataset.x`` so that
partitioning, hold-outs and fingerprints treat text like any other data. Its label is its domain,
so label-skew and domain-skew partitions both split clients by domain.

``text-mix`` (built in, offline): Python source code, English documentation prose and structured
data, from files every Python installation with scikit-learn has (see
:func:`fedmoe.io.datasets.raw_text_mix`). Windows start at offsets drawn with a fixed generator
(seed 2411_02115, independent of any user seed), so every install with the same files sees the
same bytes.
"""

from __future__ import annotations

import numpy as np

from fedmoe.data.base import Dataset
from fedmoe.errors import InputError

WINDOW = 64  # bytes a sample's model input holds (the sample has one more: the last target)
PER_DOMAIN = 1200  # windows drawn from each domain's text
VOCAB = 256  # byte values
TEXT_MIX_DOMAINS = ("code", "prose", "data")
_OFFSET_SEED = 241102115


def byte_windows(
    streams: list[bytes],
    names: tuple[str, ...],
    source: str,
    per_domain: int = PER_DOMAIN,
    window: int = WINDOW,
) -> Dataset:
    """Windows of ``window + 1`` bytes from each domain's text.

    Parameters
    ----------
    streams
        Domain d → its text, as bytes (documents joined).
    names
        Domain names, one per stream.
    source
        The dataset's name.
    per_domain
        Windows drawn per domain (fewer when its text is short: at most one per ``window + 1``
        bytes, without overlap).
    """
    if len(streams) != len(names) or not streams:
        raise InputError(f"{source}: no text, or a domain without a name")
    rng = np.random.default_rng(_OFFSET_SEED)
    xs, ds = [], []
    span = window + 1
    for d, text in enumerate(streams):
        arr = np.frombuffer(text, dtype=np.uint8)
        slots = arr.shape[0] // span  # non-overlapping windows available
        if slots == 0:
            raise InputError(
                f"{source}: domain '{names[d]}' has {arr.shape[0]} bytes of text, fewer than one "
                f"sample of {span}",
                hint="give each domain more text",
            )
        take = min(per_domain, slots)
        starts = np.sort(rng.choice(slots, size=take, replace=False)) * span
        xs.append(arr[starts[:, None] + np.arange(span)[None, :]])  # (take, span)
        ds.append(np.full(take, d, dtype=np.int64))
    x = np.concatenate(xs).astype(np.float32)
    domain = np.concatenate(ds)
    return Dataset(source, x, domain.copy(), domain, tuple(names), tuple(names), True)


def text_mix(raw: np.ndarray, domain_of_byte: np.ndarray) -> Dataset:
    """The built-in ``text-mix``: code, prose and data windows (raw bytes and each byte's domain,
    as :func:`fedmoe.io.datasets.raw_text_mix` reads them)."""
    streams = [raw[domain_of_byte == d].tobytes() for d in range(len(TEXT_MIX_DOMAINS))]
    return byte_windows(streams, TEXT_MIX_DOMAINS, "text-mix")


def tokens_of(x: np.ndarray) -> np.ndarray:
    """The byte ids of text samples (n, WINDOW + 1) float32 → int64, refusing non-byte values."""
    if x.ndim != 2 or not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() >= VOCAB:
        raise InputError(
            "the dataset's samples are not byte windows (integers 0..255 in rows)",
            hint="train a language model on a text dataset (text-mix, .jsonl, a folder of text)",
        )
    return x.astype(np.int64)
