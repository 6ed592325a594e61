"""PNG figures for people: partition heatmaps, affinity heatmaps, accuracy and traffic curves, the
sync graph. matplotlib is an optional extra (``pip install 'fedmoe[plot]'``); every function returns
PNG bytes, and the caller writes them atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np

from fedmoe.errors import UsageError


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        need_matplotlib()
    return plt


def warm() -> None:
    """Import matplotlib and load its fonts (a process's first figure pays ~1 s for them), so that
    a process that will draw can do it ahead, while it would otherwise wait; nothing without
    matplotlib."""
    try:
        plt = _pyplot()
    except UsageError:
        return
    fig = plt.figure(figsize=(1, 1))
    fig.text(0.5, 0.5, "0", fontsize=8)
    fig.canvas.draw()
    plt.close(fig)


def need_matplotlib() -> NoReturn:
    """Say that the plots need matplotlib, and how to install it."""
    raise UsageError(
        "plots need matplotlib, which is not installed",
        hint="pip install 'fedmoe[plot]' (or pip install matplotlib)",
    ) from None


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


def bands(
    series: Mapping[str, tuple[Sequence[int], Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    references: Collection[str] = (),
) -> bytes:
    """One mean line per named series ``(rounds, mean, std)`` with a ± one standard deviation
    band; NaN means (rounds without an evaluation) are skipped, so the line joins the evaluated
    rounds; ``references`` dashed."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (rounds, mean, std) in series.items():
        m = np.asarray(mean, dtype=np.float64)
        sd = np.asarray(std, dtype=np.float64)
        x = np.asarray(rounds, dtype=np.float64)
        ok = ~np.isnan(m)
        ref = name in references
        (line,) = ax.plot(x[ok], m[ok], marker="o", markersize=3, linestyle="--" if ref else "-",
                          label=name + (" (reference)" if ref else ""))  # fmt: skip
        ax.fill_between(x[ok], (m - sd)[ok], (m + sd)[ok], color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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


def group_colours(groups: Sequence[int]) -> dict[int, Any]:
    """A colour per group id (a domain): tab10 up to ten groups, tab20 beyond; grey for unknown
    (a negative id)."""
    plt = _pyplot()
    known = sorted({g for g in groups if g >= 0})
    cmap = plt.get_cmap("tab10" if len(known) <= 10 else "tab20")
    colours: dict[int, Any] = {g: cmap(i % cmap.N) for i, g in enumerate(known)}
    colours.update({g: (0.6, 0.6, 0.6, 1.0) for g in groups if g < 0})
    return colours


def accuracy_panels(
    panels: Sequence[tuple[str, Mapping[str, tuple[Sequence[int], Sequence[float]]]]],
    references: Collection[str] = (),
    ylabel: str = "accuracy (%)",
    scale: float = 100.0,
    score: str = "accuracy",
) -> bytes:
    """A score per round (accuracy by default), one panel per kind side by side (same y scale),
    one line per method through its evaluated rounds (``(rounds, values)``, drawn × ``scale``:
    fractions in %); ``references`` dashed."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(5.0 * n + 1.5, 4.0), sharey=True, squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        for i, (name, (xs, ys)) in enumerate(series.items()):
            (line,) = ax.plot(
                list(xs),
                [scale * y for y in ys],
                marker="o",
                markersize=3,
                color=f"C{i % 10}",
                linestyle="--" if name in references else "-",
                label=name + (" (reference)" if name in references else ""),
            )
            handles.setdefault(name, line)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(f"{score} per evaluated round")
    if handles:
        fig.legend(
            list(handles.values()),
            [h.get_label() for h in handles.values()],
            loc="upper left",
            bbox_to_anchor=(1.0, 0.9),
            fontsize=8,
        )
    fig.tight_layout()
    return _png(fig)


def _block_ticks(groups: Sequence[int]) -> tuple[list[float], list[float]]:
    """Centres of each run of equal groups and the boundaries between runs (heatmap coordinates)."""
    starts = [i for i in range(len(groups)) if i == 0 or groups[i] != groups[i - 1]]
    ends = [*starts[1:], len(groups)]
    return [(a + b - 1) / 2 for a, b in zip(starts, ends, strict=True)], [
        b - 0.5 for b in ends[:-1]
    ]


def client_similarity(
    matrix: np.ndarray,
    block: np.ndarray,
    clients: Sequence[int],
    groups: Sequence[int],
    names: Sequence[str],
    title: str,
    max_client_ticks: int = 40,
) -> bytes:
    """A client × client similarity heatmap (clients grouped by domain, block boundaries drawn,
    domain names on top, client ids as tick labels coloured by domain up to ``max_client_ticks``
    clients, domain names only beyond) beside a domain × domain table of shares in [0, 1]
    (``block``, each row summing to one; ``names``: one per block, in order)."""
    plt = _pyplot()
    n, g = matrix.shape[0], block.shape[0]
    finite = matrix[np.isfinite(matrix)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")  # NaN: light grey
    side = min(10.0, max(5.0, 0.2 * n + 2.5))
    fig, (ax, bx) = plt.subplots(
        1,
        2,
        figsize=(side + 5.0, side),
        gridspec_kw={"width_ratios": [side, 3.0]},
        layout="constrained",
    )
    im = ax.imshow(matrix, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    centres, bounds = _block_ticks(groups)
    for b in bounds:
        ax.axhline(b, color="white", lw=1.5)
        ax.axvline(b, color="white", lw=1.5)
    colours = group_colours(groups)
    if n <= max_client_ticks:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels([str(c) for c in clients], fontsize=7, rotation=90)
        ax.set_yticklabels([str(c) for c in clients], fontsize=7)
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            for label, grp in zip(ticks, groups, strict=True):
                label.set_color(colours[grp])
        ax.set_xlabel("client b (id, coloured by dominant domain)")
        ax.set_ylabel("client a (id, coloured by dominant domain)")
    else:  # many clients: no per-client labels, the domain blocks named on both axes
        ax.set_xticks(centres)
        ax.set_yticks(centres)
        ax.set_xticklabels([], fontsize=8)
        ax.set_yticklabels(list(names), fontsize=8)
        ax.set_xlabel(f"client b ({n} clients, grouped by dominant domain)")
        ax.set_ylabel(f"client a ({n} clients, grouped by dominant domain)")
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres)
    top.set_xticklabels(list(names), fontsize=8)
    ax.set_title(title + "\n", fontsize=10)
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label("mean over a's experts of the best cosine similarity to b's experts\n"
                   "(candidate neighbours only; grey: none, or a = b)", fontsize=8)  # fmt: skip
    shares = plt.get_cmap("Blues")
    bim = bx.imshow(block, cmap=shares, vmin=0.0, vmax=1.0, interpolation="nearest")
    bx.set_xticks(range(g))
    bx.set_yticks(range(g))
    bx.set_xticklabels(list(names), fontsize=8, rotation=45, ha="right")
    bx.set_yticklabels(list(names), fontsize=8)
    bx.set_xlabel("domain of the neighbour's client")
    bx.set_ylabel("domain of the expert's client")
    bx.set_title("where the candidate neighbours\nof other clients lie", fontsize=9)
    if g <= 12:
        for (i, j), v in np.ndenumerate(block):
            if np.isfinite(v):
                bx.text(j, i, f"{100 * v:.0f}%", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 else "black")  # fmt: skip
    bcbar = fig.colorbar(bim, ax=bx, shrink=0.5, location="bottom")
    bcbar.set_label("share of a row's other-client candidates", fontsize=8)
    return _png(fig)


def sync_graph(
    nodes: Sequence[int],
    groups: Sequence[int],
    names: Sequence[str],
    active: Sequence[bool],
    edges: Sequence[tuple[int, int, float]],
    title: str,
    caption: str,
) -> bytes:
    """Who pulls experts from whom: clients on a circle in the given order (a gap between
    groups), labelled by client id and coloured by group (``names``: each node's group name);
    an arrow per ``(source id, target id, weight)``, its width and opacity by weight, in the
    source's colour when both ends share a group, grey otherwise; clients that did not take part
    drawn hollow."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    n = len(nodes)
    slots, gaps = [], 0
    for i in range(n):
        if i and groups[i] != groups[i - 1]:
            gaps += 1
        slots.append(i + gaps)
    total = max(n + gaps + (1 if gaps else 0), 1)
    angle = np.pi / 2 - 2 * np.pi * np.asarray(slots, dtype=np.float64) / total
    xy = {c: (float(np.cos(a)), float(np.sin(a))) for c, a in zip(nodes, angle, strict=True)}
    colours = group_colours(groups)
    group_of = dict(zip(nodes, groups, strict=True))
    fig, ax = plt.subplots(figsize=(7.5, 7.5))
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
    ax.set_aspect("equal")
    ax.apply_aspect()
    # each arrow stops 9 points short of both nodes' centres (the nodes' radius is 8 points):
    # shortened here, along the way the arc leaves each end, instead of by matplotlib's shrinkA/B,
    # whose path splitting took a third of the figure's time
    lo, hi = ax.get_xlim()
    gap = 9 * fig.dpi / 72 * (hi - lo) / ax.get_window_extent().width  # 9 points, in data units
    top = max((w for _, _, w in edges), default=1.0) or 1.0
    for src, dst, w in sorted(edges, key=lambda e: e[2]):  # heaviest drawn last, on top
        if src not in xy or dst not in xy:
            continue
        same = group_of[src] == group_of[dst] and group_of[src] >= 0
        r = w / top
        start, end = _shortened(xy[src], xy[dst], ARC, gap)
        ax.annotate(
            "",
            xy=end,
            xytext=start,
            arrowprops={
                "arrowstyle": "-|>",
                "mutation_scale": 6 + 6 * r,
                "color": colours[group_of[src]] if same else "0.45",
                "alpha": (0.12 + 0.7 * r) if same else (0.06 + 0.45 * r),
                "lw": 0.3 + 3.2 * r,
                "shrinkA": 0,
                "shrinkB": 0,
                "connectionstyle": f"arc3,rad={ARC}",
            },
        )
    pts = np.array([xy[c] for c in nodes]).reshape(-1, 2)
    face = [colours[g] if a else "white" for g, a in zip(groups, active, strict=True)]
    ax.scatter(pts[:, 0], pts[:, 1], s=260 if n <= 40 else 90, zorder=3, c=face,
               edgecolors=[colours[g] for g in groups], linewidths=1.5)  # fmt: skip
    if n <= 80:
        for c, (x, y), a in zip(nodes, pts, active, strict=True):
            ax.text(x, y, str(c), ha="center", va="center", fontsize=7 if n <= 40 else 5,
                    color="white" if a else "black", zorder=4)  # fmt: skip
    legend = [
        Line2D([], [], marker="o", linestyle="", markersize=8, color=colours[g], label=name)
        for g, name in dict(zip(groups, names, strict=True)).items()
    ]
    legend.append(Line2D([], [], color="0.3", lw=1.5, label="pull within a domain (its colour)"))
    legend.append(Line2D([], [], color="0.45", lw=1.5, alpha=0.6, label="pull across domains"))
    if not all(active):
        legend.append(Line2D([], [], marker="o", linestyle="", markersize=8, color="0.3",
                             markerfacecolor="white", label="did not take part"))  # fmt: skip
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              title="dominant true domain", title_fontsize=8)  # fmt: skip
    ax.set_title(title, fontsize=10)
    ax.text(0.5, -0.02, caption + "; node label: client id", transform=ax.transAxes,
            ha="center", va="top", fontsize=8)  # fmt: skip
    ax.axis("off")
    return _png(fig)


ARC = 0.12  # the sync graph's arrows: arc3's bend, as a fraction of the chord


def _shortened(
    a: tuple[float, float], b: tuple[float, float], rad: float, gap: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The ends of an arc3 arrow from ``a`` to ``b`` moved ``gap`` inwards, each along the
    direction in which the arc leaves it (towards the arc's control point)."""
    (x1, y1), (x2, y2) = a, b
    dx, dy = x2 - x1, y2 - y1
    if math.hypot(dx, dy) <= 2 * gap:  # too close to shorten: leave it
        return a, b
    cx, cy = (x1 + x2) / 2 + rad * dy, (y1 + y2) / 2 - rad * dx  # arc3's control point

    def toward(x: float, y: float) -> tuple[float, float]:
        ux, uy = cx - x, cy - y
        n = math.hypot(ux, uy) or 1.0
        return x + gap * ux / n, y + gap * uy / n

    return toward(x1, y1), toward(x2, y2)
