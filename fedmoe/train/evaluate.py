"""Accuracy of a model on a set of samples (personalised: a client's own model on its local test
split; global: on the held-out global test set), overall and per domain."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmoe.data import Dataset
from fedmoe.model import MoEClassifier, MoEConfig, build_model, holding
from fedmoe.partition import ClientSplit


@torch.no_grad()
def predict(model: MoEClassifier, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Predicted class of each sample of ``x`` (n, *input_shape) → (n,) int64."""
    model.eval()
    out = [
        model(x[i : i + batch_size]).logits.argmax(dim=1) for i in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(out).numpy() if out else np.empty(0, dtype=np.int64)


def accuracy(
    pred: np.ndarray, y: np.ndarray, domains: np.ndarray, num_domains: int
) -> tuple[float | None, list[float | None], int]:
    """Overall accuracy, per-domain accuracy (None where a domain has no sample), and the count."""
    n = int(y.shape[0])
    if n == 0:
        return None, [None] * num_domains, 0
    hit = pred == y  # (n,)
    per_domain: list[float | None] = []
    for d in range(num_domains):
        sel = domains == d
        per_domain.append(round(float(hit[sel].mean()), 6) if sel.any() else None)
    return round(float(hit.mean()), 6), per_domain, n


@dataclass(frozen=True)
class ClientEval:
    """One client's model evaluated: what a client sends the server after evaluating (its counts,
    no sample), and what :func:`summarise` combines."""

    client: int
    local_acc: float | None  # on its local test split (None without samples)
    local_n: int
    global_acc: float | None  # on the global test set (None without one)
    hits_by_domain: tuple[int, ...]  # correct local test predictions per domain
    n_by_domain: tuple[int, ...]  # local test samples per domain
    global_by_domain: tuple[float | None, ...]  # global accuracy per domain

    def to_dict(self) -> dict[str, Any]:
        """JSON form (for a message)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientEval:
        """Inverse of :meth:`to_dict`."""
        return cls(
            int(data["client"]),
            None if data["local_acc"] is None else float(data["local_acc"]),
            int(data["local_n"]),
            None if data["global_acc"] is None else float(data["global_acc"]),
            tuple(int(v) for v in data["hits_by_domain"]),
            tuple(int(v) for v in data["n_by_domain"]),
            tuple(None if v is None else float(v) for v in data["global_by_domain"]),
        )


def evaluate_client(
    config: MoEConfig,
    state: dict[str, torch.Tensor],
    dataset: Dataset,
    client: int,
    split: ClientSplit,
    global_test: np.ndarray,
    model: MoEClassifier | None = None,
    global_scores: tuple[float | None, tuple[float | None, ...]] | None = None,
) -> ClientEval:
    """``client``'s model on its local test split and on the global test set; ``model``: a module
    of ``config`` to load ``state`` into (its tensors are overwritten) instead of building one;
    ``global_scores``: the global accuracy and its per-domain values, when already measured for
    a model with the same tensors (see :func:`evaluate_models`)."""
    from fedmoe.train.client import tensors

    D = dataset.num_domains
    model = holding(model, config, state)
    x, _ = tensors(dataset, split.test)
    yl, dl = np.asarray(dataset.y[split.test]), np.asarray(dataset.domain[split.test])
    pred = predict(model, x)
    local, _, n_local = accuracy(pred, yl, dl, D)
    hits = np.zeros(D, dtype=np.int64)
    count = np.zeros(D, dtype=np.int64)
    np.add.at(hits, dl, pred == yl)
    np.add.at(count, dl, 1)
    gacc: float | None = None
    gdom: list[float | None] = [None] * D
    if global_scores is not None:
        gacc, gdom = global_scores[0], list(global_scores[1])
    elif len(global_test):
        xg, _ = tensors(dataset, global_test)
        yg = np.asarray(dataset.y[global_test])
        dg = np.asarray(dataset.domain[global_test])
        gacc, gdom, _ = accuracy(predict(model, xg), yg, dg, D)
    return ClientEval(
        client,
        local,
        n_local,
        gacc,
        tuple(int(v) for v in hits),
        tuple(int(v) for v in count),
        tuple(gdom),
    )


def summarise(evals: list[ClientEval], num_domains: int) -> dict[str, Any]:
    """The run's accuracy summary from every client's evaluation (in client order).

    Returns
    -------
    dict
        ``clients``: per client ``{id, local_acc, local_n, global_acc}``; summary keys
        ``mean_local_acc``, ``worst_local_acc``, ``mean_global_acc``, ``local_acc_by_domain``
        (pooled local test predictions of every client, per domain) and ``global_acc_by_domain``
        (mean over clients).
    """
    D = num_domains
    ordered = sorted(evals, key=lambda e: e.client)
    hits_by_domain = np.zeros(D)
    n_by_domain = np.zeros(D)
    for ev in ordered:
        hits_by_domain += np.asarray(ev.hits_by_domain, dtype=np.float64)
        n_by_domain += np.asarray(ev.n_by_domain, dtype=np.float64)
    rows = [
        {"id": e.client, "local_acc": e.local_acc, "local_n": e.local_n, "global_acc": e.global_acc}
        for e in ordered
    ]
    locals_ = [r["local_acc"] for r in rows if r["local_acc"] is not None]
    globals_ = [r["global_acc"] for r in rows if r["global_acc"] is not None]
    table = np.array(
        [[np.nan if v is None else v for v in e.global_by_domain] for e in ordered],
        dtype=np.float64,
    ).reshape(len(ordered), D)
    have = ~np.isnan(table)
    total = np.where(have, table, 0.0).sum(axis=0)
    gmean = np.where(have.any(axis=0), total / np.maximum(have.sum(axis=0), 1), np.nan)
    return {
        "mean_local_acc": round(float(np.mean(locals_)), 6) if locals_ else None,
        "worst_local_acc": round(float(np.min(locals_)), 6) if locals_ else None,
        "mean_global_acc": round(float(np.mean(globals_)), 6) if globals_ else None,
        "local_acc_by_domain": [
            round(float(h / n), 6) if n else None
            for h, n in zip(hits_by_domain, n_by_domain, strict=True)
        ],
        "global_acc_by_domain": [None if np.isnan(v) else round(float(v), 6) for v in gmean],
        "clients": rows,
    }


def evaluate_models(
    config: MoEConfig,
    states: dict[int, dict[str, torch.Tensor]],
    dataset: Dataset,
    clients: tuple[ClientSplit, ...],
    global_test: np.ndarray,
) -> dict[str, Any]:
    """Personalised and global accuracy of per-client models (see :func:`summarise`).

    Parameters
    ----------
    states
        Client id → that client's model tensors.
    clients, global_test
        The partition's splits and global test indices.
    """
    order = sorted(states)
    model = build_model(config, states[order[0]]) if order else None  # one module, reloaded
    # clients holding the same tensors (FedAvg's global model, a cluster's model) score the same
    # on the global test set: it is predicted once per distinct model (its bytes hashed), the
    # same computation on the same bits as for each of them
    scored: dict[bytes, tuple[float | None, tuple[float | None, ...]]] = {}
    evals = []
    for c in order:
        key = _fingerprint(states[c])
        ev = evaluate_client(
            config, states[c], dataset, c, clients[c], global_test, model, scored.get(key)
        )
        scored.setdefault(key, (ev.global_acc, ev.global_by_domain))
        evals.append(ev)
    return summarise(evals, dataset.num_domains)


def _fingerprint(state: dict[str, torch.Tensor]) -> bytes:
    """A digest of a model's names, dtypes, shapes and bytes."""
    import hashlib

    h = hashlib.blake2b(digest_size=32)
    for name in sorted(state):
        t = state[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()
