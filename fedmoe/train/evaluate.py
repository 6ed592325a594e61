"""Accuracy of a model on a set of samples (personalised: a client's own model on its local test
split; global: on the held-out global test set), overall and per domain."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedmoe.data import Dataset
from fedmoe.model import MoEClassifier, MoEConfig, build_model
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


def evaluate_models(
    config: MoEConfig,
    states: dict[int, dict[str, torch.Tensor]],
    dataset: Dataset,
    clients: tuple[ClientSplit, ...],
    global_test: np.ndarray,
) -> dict[str, Any]:
    """Personalised and global accuracy of per-client models.

    Parameters
    ----------
    states
        Client id → that client's model tensors.
    clients, global_test
        The partition's splits and global test indices.

    Returns
    -------
    dict
        ``clients``: per client ``{id, local_acc, local_n, global_acc}``; summary keys
        ``mean_local_acc``, ``worst_local_acc``, ``mean_global_acc``, ``local_acc_by_domain``
        (pooled local test predictions of every client, per domain) and ``global_acc_by_domain``
        (mean over clients).
    """
    from fedmoe.train.client import tensors

    xg, _ = tensors(dataset, global_test)
    yg = np.asarray(dataset.y[global_test])
    dg = np.asarray(dataset.domain[global_test])
    D = dataset.num_domains
    rows = []
    hits_by_domain = np.zeros(D)
    n_by_domain = np.zeros(D)
    global_by_domain = []
    for cid in sorted(states):
        model = build_model(config, states[cid])
        split = clients[cid]
        x, _ = tensors(dataset, split.test)
        yl, dl = np.asarray(dataset.y[split.test]), np.asarray(dataset.domain[split.test])
        pred = predict(model, x)
        local, _, n_local = accuracy(pred, yl, dl, D)
        np.add.at(hits_by_domain, dl, pred == yl)
        np.add.at(n_by_domain, dl, 1)
        gacc, gdom, _ = (
            accuracy(predict(model, xg), yg, dg, D) if len(yg) else (None, [None] * D, 0)
        )
        global_by_domain.append([np.nan if v is None else v for v in gdom])
        rows.append({"id": cid, "local_acc": local, "local_n": n_local, "global_acc": gacc})
    locals_ = [r["local_acc"] for r in rows if r["local_acc"] is not None]
    globals_ = [r["global_acc"] for r in rows if r["global_acc"] is not None]
    table = np.array(global_by_domain, dtype=np.float64).reshape(len(global_by_domain), D)
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
