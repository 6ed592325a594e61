"""PNG figures for people: partition heatmaps, affinity heatmaps, accuracy and traffic curves, the
sync graph. matplotlib is an optional extra (``pip install 'fedmoe[plot]'``); every function returns
PNG bytes, and the caller writes them atomically.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmoe.errors import UsageError


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "plots need matplotlib, which is not installed",
            hint="pip install 'fedmoe[plot]' (or pip install matplotlib)",
        ) from None
    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _heatmap(ax: Any, data: np.ndarray, xlabels: Sequence[str], ylabel: str, title: str) -> None:
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(xlabels)))
    ax.set_xticklabels(xlabels, rotation=45 if max(map(len, xlabels), default=0) > 3 else 0)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def partition_heatmaps(
    label_counts: np.ndarray,
    domain_counts: np.ndarray,
    class_names: Sequence[str],
    domain_names: Sequence[str],
) -> bytes:
    """Client × label and client × domain count heatmaps, side by side."""
    plt = _pyplot()
    n = label_counts.shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, max(3.0, min(12.0, 0.25 * n + 1.5))))
    _heatmap(axes[0], label_counts, list(class_names), "client", "samples per label")
    _heatmap(axes[1], domain_counts, list(domain_names), "client", "samples per domain")
    return _png(fig)


def affinity_heatmap(
    table: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str
) -> bytes:
    """A (client-expert × domain-or-label) share heatmap."""
    plt = _pyplot()
    rows = table.shape[0]
    fig, ax = plt.subplots(
        figsize=(max(4.0, 0.5 * len(col_labels) + 3), min(16.0, 0.12 * rows + 2))
    )
    im = ax.imshow(table, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title)
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(list(col_labels), rotation=45)
    step = max(1, rows // 40)
    ax.set_yticks(range(0, rows, step))
    ax.set_yticklabels([row_labels[i] for i in range(0, rows, step)], fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def curves(
    series: Mapping[str, Sequence[float]], xlabel: str, ylabel: str, title: str, logy: bool = False
) -> bytes:
    """One line per named series against the round number."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        ax.plot(range(1, len(ys) + 1), list(ys), marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _png(fig)


def bands(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
) -> bytes:
    """One mean line per named series with a ± one standard deviation band (rounds from 1;
    NaN values, rounds without an evaluation, are skipped)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (mean, std) in series.items():
        m = np.asarray(mean, dtype=np.float64)
        sd = np.asarray(std, dtype=np.float64)
        x = np.arange(1, len(m) + 1)
        ok = ~np.isnan(m)
        (line,) = ax.plot(x[ok], m[ok], marker="o", markersize=3, label=name)
        ax.fill_between(x[ok], (m - sd)[ok], (m + sd)[ok], color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 6:  # many methods: the legend beside the axes, not over the lines
        fig.set_size_inches(10, 4.5)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
    elif series:
        ax.legend(fontsize=8)
    return _png(fig)


def traffic_bars(methods: Sequence[str], server: Sequence[float], p2p: Sequence[float]) -> bytes:
    """Server and peer-to-peer bytes per round for each method, as grouped bars (MiB)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(methods))
    ax.bar(x - 0.2, np.asarray(server) / 2**20, width=0.4, label="server")
    ax.bar(x + 0.2, np.asarray(p2p) / 2**20, width=0.4, label="peer-to-peer")
    ax.set_xticks(x)
    ax.set_xticklabels(list(methods), rotation=20)
    ax.set_ylabel("MiB per round")
    ax.set_title("traffic per round")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def sync_graph(edges: np.ndarray, title: str) -> bytes:
    """Which clients pull experts from which: an (N, N) count matrix drawn as a graph on a circle.

    ``edges[i, j]`` is the number of experts client ``j`` fetches from client ``i``.
    """
    plt = _pyplot()
    n = edges.shape[0]
    angle = 2 * np.pi * np.arange(n) / max(n, 1)
    xy = np.stack([np.cos(angle), np.sin(angle)], axis=1)  # (N, 2)
    fig, ax = plt.subplots(figsize=(6, 6))
    top = edges.max() if edges.size and edges.max() > 0 else 1
    for src, dst in zip(*np.nonzero(edges), strict=True):
        w = edges[src, dst] / top
        ax.annotate(
            "",
            xy=xy[dst],
            xytext=xy[src],
            arrowprops={"arrowstyle": "->", "alpha": 0.25 + 0.6 * w, "lw": 0.5 + 2.0 * w},
        )
    ax.scatter(xy[:, 0], xy[:, 1], s=180, zorder=3, color="tab:blue")
    for i in range(n):
        ax.text(
            xy[i, 0],
            xy[i, 1],
            str(i),
            ha="center",
            va="center",
            color="white",
            fontsize=7,
            zorder=4,
        )
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.axis("off")
    return _png(fig)
