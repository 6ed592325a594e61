"""The run report's figures: what each plot shows, computed from the report and the run's artefacts
by pure functions (tested on their own), then drawn by :mod:`fedmoe.plots`.

- ``accuracy.png`` (``perplexity.png`` for a language model): personalised (mean local) and
  global score per evaluated round, one line per method; reference methods dashed.
- ``traffic.png``: server and peer-to-peer MiB per round per method.
- ``affinity.png``: FedMoE-DA's latest affinity as a client × client similarity, clients grouped
  by their dominant true domain, beside where each domain's candidate neighbours lie.
- ``sync_graph.png``: FedMoE-DA's latest sync plan as a graph of who pulls experts from whom,
  nodes labelled by client id and coloured by dominant true domain.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.io.run_folder import RunFolder, read_text
from fedmoe.run.quality import quality_named
from fedmoe.run.results_table import references

MAX_ARTEFACT_BYTES = 256 << 20  # an affinity or plan larger than this is not drawn
UNKNOWN = -1  # the group of a client whose domain is not known


def quality_series(
    report: dict[str, Any],
) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Per score key (``mean_local_acc``, ``mean_global_acc``, or the ``_ppl`` keys of a language
    model) and method, the evaluated rounds and their values: rounds without an evaluation are
    left out, so a line joins the evaluated rounds (``eval_every`` > 1) instead of breaking into
    dots. A key no method has is left out."""
    q = quality_named(report.get("quality"))
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for key in (q.mean_local, q.mean_global):
        per_method = {}
        for m, d in report["methods"].items():
            pr = d["per_round"]
            pts = [
                (int(r), float(v))
                for r, v in zip(pr["round"], pr.get(key, [None] * len(pr["round"])), strict=True)
                if isinstance(v, (int, float))
            ]
            per_method[m] = ([r for r, _ in pts], [v for _, v in pts])
        if any(xs for xs, _ in per_method.values()):
            out[key] = per_method
    return out


def client_domains(partition: dict[str, Any]) -> tuple[dict[int, int], list[str]]:
    """Each client's dominant true domain (the domain it has most samples of, the lowest on a tie;
    :data:`UNKNOWN` without domain counts) from ``partition.json``, and the domain names."""
    names = partition.get("dataset", {}).get("domain_names") or []
    domains: dict[int, int] = {}
    for c in partition.get("clients", []):
        counts = c.get("domain_counts")
        ok = isinstance(counts, list) and counts and sum(counts) > 0
        domains[int(c["id"])] = int(np.argmax(counts)) if ok else UNKNOWN
    return domains, [str(n) for n in names]


def group_order(clients: list[int], domains: dict[int, int]) -> list[int]:
    """``clients`` sorted by dominant domain, then id (unknown domains last)."""
    return sorted(clients, key=lambda c: (domains.get(c, UNKNOWN) < 0, domains.get(c, UNKNOWN), c))


def group_names(groups: list[int], names: list[str]) -> list[str]:
    """A readable name for each group id: the domain's name, ``domain g`` without one, ``?`` for
    an unknown domain."""
    return ["?" if g < 0 else names[g] if g < len(names) else f"domain {g}" for g in groups]


@dataclass(frozen=True)
class SimilarityView:
    """The client × client view of an affinity artefact."""

    round: int  # the round the affinity was computed in
    clients: tuple[int, ...]  # client ids in plotted order (grouped by dominant domain)
    groups: tuple[int, ...]  # each plotted client's dominant domain (UNKNOWN: not known)
    group_names: tuple[str, ...]  # the name of each distinct group, in plotted order
    matrix: np.ndarray  # (N, N) mean best similarity of row client's experts to column client's
    block: np.ndarray  # (G, G) where row group's candidate neighbours on other clients lie
    nearest_same_domain: float | None  # share of nearest other-client neighbours in the same domain


def affinity_view(
    affinity: dict[str, Any], domains: dict[int, int], names: list[str]
) -> SimilarityView:
    """Client × client similarity from the affinity artefact's neighbour lists.

    ``matrix[a, b]`` is, over client ``a``'s experts (and every MoE layer), the mean of each
    expert's best cosine similarity to any expert of client ``b``. Only the candidate neighbours
    the artefact lists are known, so an expert none of whose candidates belongs to ``b`` is left
    out of that mean, and a pair with none at all is NaN; the diagonal (a client with itself) is
    NaN. Those known values are the high ones, so averaging them over a domain block would
    flatter distant domains; ``block`` instead counts: ``block[p, q]`` is the share of the
    candidate neighbours on other clients, listed for the experts of group ``p``'s clients, that
    belong to clients of group ``q`` (each row sums to one; NaN for a group without any). A
    diagonal near one says the affinity finds the true domains; it is how a run with many clients
    is best read.
    """
    clients = [int(c) for c in affinity["clients"]]
    n = len(clients)
    order = group_order(clients, domains)
    pos = {c: i for i, c in enumerate(order)}  # plotted position of each client
    total = np.zeros((n, n))
    count = np.zeros((n, n))
    listed = np.zeros((n, n))  # (N, N) candidate entries of row client's experts on column's
    for layer in affinity["layers"]:
        e = int(layer["num_experts"])
        for m, row in enumerate(layer["neighbours"]):
            a = m // e
            best = np.full(n, -np.inf)  # (N,) this expert's best similarity to each client
            for other, sim in row:
                b = int(other) // e
                if b != a:
                    best[b] = max(best[b], float(sim))
                    listed[pos[clients[a]], pos[clients[b]]] += 1
            seen = np.isfinite(best)
            i = pos[clients[a]]
            cols = [pos[clients[b]] for b in np.nonzero(seen)[0]]
            total[i, cols] += best[seen]
            count[i, cols] += 1
    matrix = np.divide(total, count, out=np.full((n, n), np.nan), where=count > 0)
    groups = [domains.get(c, UNKNOWN) for c in order]
    distinct = list(dict.fromkeys(groups))
    gidx = np.array([distinct.index(g) for g in groups], dtype=np.int64)
    onehot = np.eye(len(distinct))[gidx]  # (N, G)
    per_group = onehot.T @ listed @ onehot  # (G, G) candidate entries between groups
    sums = per_group.sum(axis=1, keepdims=True)
    block = np.divide(per_group, sums, out=np.full_like(per_group, np.nan), where=sums > 0)
    summary = affinity.get("summary")
    same = summary.get("nearest_same_dominant_domain") if isinstance(summary, dict) else None
    return SimilarityView(
        round=int(affinity.get("round", 0)),
        clients=tuple(order),
        groups=tuple(groups),
        group_names=tuple(group_names(distinct, names)),
        matrix=matrix,
        block=block,
        nearest_same_domain=float(same) if isinstance(same, (int, float)) else None,
    )


@dataclass(frozen=True)
class SyncView:
    """Who pulls experts from whom in one sync plan."""

    round: int  # the plan's round
    nodes: tuple[int, ...]  # client ids, grouped by dominant domain (the order around the circle)
    groups: tuple[int, ...]  # each node's dominant domain (UNKNOWN: not known)
    group_names: tuple[str, ...]  # each node's domain name
    active: tuple[bool, ...]  # whether each node took part in the round
    edges: tuple[tuple[int, int, float], ...]  # (source id, target id, weight), weight > 0
    weight: str  # what an edge's weight is
    within_domain: float | None  # share of the total edge weight between clients of one domain


def sync_view(plan: dict[str, Any], domains: dict[int, int], names: list[str]) -> SyncView:
    """The graph of a sync plan: an edge from client ``s`` to client ``t`` when ``t``'s merged
    experts draw on ``s``'s (Eq. 11 of FedMoE-DA), its weight the mean over ``t``'s merged expert
    rows (every MoE layer) of the merge weight on ``s``'s experts, so a weight of 0.25 means a
    quarter of what ``t``'s experts become comes from ``s``. A plan without merge rows (one that
    merges no experts) falls back to its transfers: the share of ``t``'s experts pulled from ``s``.
    """
    nodes = group_order([int(c) for c in plan["clients"]], domains)
    active = set(int(c) for c in plan.get("participants", nodes))
    weights: dict[tuple[int, int], float] = {}
    rows: dict[int, int] = {}
    for layer in plan.get("layers", []):
        for target in layer.get("targets", []):
            t = int(target["client"])
            rows[t] = rows.get(t, 0) + 1
            for s in target["sources"]:
                if int(s["client"]) != t:
                    key = (int(s["client"]), t)
                    weights[key] = weights.get(key, 0.0) + float(s["weight"])
    what = "mean merge weight of the target's experts on the source's experts"
    if rows:
        edges = {k: w / rows[k[1]] for k, w in weights.items()}
    else:
        per_client = sum(int(x) for x in plan.get("sizes", {}).get("num_experts", [])) or 1
        edges = {}
        for tr in plan.get("transfers", []):
            key = (int(tr["from"]), int(tr["to"]))
            edges[key] = edges.get(key, 0.0) + len(tr["experts"]) / per_client
        what = "share of the target's experts pulled from the source"
    kept = tuple(sorted((s, t, round(w, 6)) for (s, t), w in edges.items() if w > 0))
    groups = [domains.get(c, UNKNOWN) for c in nodes]
    total = sum(w for _, _, w in kept)
    inside = sum(w for s, t, w in kept if domains.get(s, UNKNOWN) == domains.get(t, UNKNOWN) >= 0)
    known = all(g >= 0 for g in groups)
    return SyncView(
        round=int(plan.get("round", 0)),
        nodes=tuple(nodes),
        groups=tuple(groups),
        group_names=tuple(group_names(groups, names)),
        active=tuple(c in active for c in nodes),
        edges=kept,
        weight=what,
        within_domain=round(inside / total, 6) if total > 0 and known else None,
    )


def latest_artefact(run_dir: Path, name: str) -> dict[str, Any] | None:
    """The newest readable ``name`` (plan.json, affinity.json) among FedMoE-DA's round folders
    (a damaged or oversized file is passed over)."""
    folder = RunFolder(run_dir).method("fedmoe-da")
    for rdir in sorted(folder.glob("round-*"), reverse=True) if folder.is_dir() else []:
        path = rdir / name
        if not path.is_file() or path.stat().st_size > MAX_ARTEFACT_BYTES:
            continue
        loaded = _json(path)
        if isinstance(loaded, dict):
            return loaded
    return None


def _json(path: Path) -> Any:
    """The JSON value in ``path``; None when it is absent or not JSON text."""
    try:
        text = read_text(path)
        return json.loads(text) if text else None
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def run_domains(run_dir: Path) -> tuple[dict[int, int], list[str]]:
    """Each client's dominant true domain and the domain names, from the run's partition.json
    (none when it is absent or damaged)."""
    part = _json(RunFolder(run_dir).partition)
    try:
        return client_domains(part) if isinstance(part, dict) else ({}, [])
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}, []


PlotTask = tuple[str, Callable[..., "bytes | None"], tuple[Any, ...]]


def plot_tasks(run_dir: Path, report: dict[str, Any]) -> list[PlotTask]:
    """The plots the run has data for, each as (file name, drawing function, its arguments): the
    functions are module-level and their arguments plain data, so each can be drawn in another
    process; each returns the PNG's bytes (None: a damaged artefact, not drawn)."""
    tasks: list[PlotTask] = []
    methods = report["methods"]
    refs = sorted(references(list(methods), report.get("recipe") or {}))
    q = quality_named(report.get("quality"))
    series = quality_series(report)
    panels = [
        (title, series[key])
        for key, title in (
            (q.mean_local, "personalised: own local test split, mean over clients"),
            (q.mean_global, "global: shared global test set, mean over clients"),
        )
        if key in series
    ]
    if panels:
        args = (panels, refs, f"{q.name} ({q.unit})", q.scale, q.name)
        tasks.append((q.plot_file, _scores_png, args))
    names = list(methods)
    server = [methods[m]["server_bytes_per_round"] for m in names]
    p2p = [methods[m]["p2p_bytes_per_round"] for m in names]
    tasks.append(("traffic.png", _traffic_png, (names, server, p2p)))
    domains, domain_names = run_domains(run_dir)
    for name, artefact, draw in (
        ("affinity.png", "affinity.json", _affinity_png),
        ("sync_graph.png", "plan.json", _sync_png),
    ):
        data = latest_artefact(run_dir, artefact)
        if data is not None:
            tasks.append((name, draw, (data, domains, domain_names)))
    return tasks


def write_plots(
    run_dir: Path,
    report: dict[str, Any],
    submit: Callable[..., Future[Any]] | None = None,
) -> list[Path]:
    """accuracy.png (perplexity.png), traffic.png, affinity.png and sync_graph.png (those the run
    has data for); returns the paths written. ``submit`` (a process pool's): draw them there,
    side by side (the same bytes: each drawing is a pure function of its arguments)."""
    from fedmoe.io.atomic import write_atomic

    tasks = plot_tasks(run_dir, report)
    if submit is None:
        pngs = [draw(*args) for _, draw, args in tasks]
    else:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            from fedmoe import plots

            plots.need_matplotlib()  # the missing extra, said here as in one process
        # the slowest first (the heatmaps, the graph's arrows): the pool takes them in order, so
        # the short ones fill in behind
        first = sorted(range(len(tasks)), key=lambda i: _COST.get(tasks[i][1], 0), reverse=True)
        futures = {i: submit(tasks[i][1], *tasks[i][2]) for i in first}
        pngs = [futures[i].result() for i in range(len(tasks))]
    written = []
    for (name, _, _), png in zip(tasks, pngs, strict=True):
        if png is not None:
            write_atomic(run_dir / name, png, force=True)
            written.append(run_dir / name)
    return written


def _scores_png(
    panels: list[tuple[str, dict[str, tuple[list[int], list[float]]]]],
    refs: list[str],
    ylabel: str,
    scale: float,
    score: str,
) -> bytes:
    from fedmoe import plots

    return plots.accuracy_panels(panels, set(refs), ylabel, scale, score)


def _traffic_png(names: list[str], server: list[float], p2p: list[float]) -> bytes:
    from fedmoe import plots

    return plots.traffic_bars(names, server, p2p)


def _artefact_plot(draw: Callable[..., bytes]) -> Callable[..., bytes | None]:
    """``draw`` of a run artefact, returning None (no plot) where the artefact is damaged. The
    wrapper keeps ``draw``'s name, so a pool pickles it by reference."""

    @functools.wraps(draw)
    def guarded(*args: Any) -> bytes | None:
        try:
            return draw(*args)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            return None

    return guarded


@_artefact_plot
def _affinity_png(aff: dict[str, Any], domains: dict[int, int], names: list[str]) -> bytes:
    from fedmoe import plots

    view = affinity_view(aff, domains, names)
    same = (
        ""
        if view.nearest_same_domain is None
        else f"\nthe nearest other-client expert shares the dominant domain for "
        f"{100 * view.nearest_same_domain:.0f}% of the client-experts"
    )
    png: bytes = plots.client_similarity(
        view.matrix,
        view.block,
        view.clients,
        view.groups,
        view.group_names,
        f"FedMoE-DA affinity, round {view.round}{same}",
    )
    return png


@_artefact_plot
def _sync_png(plan: dict[str, Any], domains: dict[int, int], names: list[str]) -> bytes:
    from fedmoe import plots

    view = sync_view(plan, domains, names)
    inside = (
        ""
        if view.within_domain is None
        else f"; {100 * view.within_domain:.0f}% of the weight within a domain"
    )
    png: bytes = plots.sync_graph(
        view.nodes,
        view.groups,
        view.group_names,
        view.active,
        view.edges,
        f"who pulls experts from whom, round {view.round}{inside}",
        f"edge width: {view.weight}",
    )
    return png


_COST: dict[Callable[..., bytes | None], float] = {  # the order to draw in: seconds, roughly
    _affinity_png: 1.1,
    _sync_png: 0.9,
    _scores_png: 0.5,
    _traffic_png: 0.2,
}
