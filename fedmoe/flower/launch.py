"""A recipe on Flower from one command (``fedmoe flower``): the Simulation Engine in this process,
or a local Deployment Engine (a SuperLink and one SuperNode per client on 127.0.0.1)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fedmoe.flower.client import ClientSettings, make_client_app
from fedmoe.flower.server import Outcome, ServerSettings, make_server_app


def _quiet() -> None:
    """Flower's and Ray's own logging down to warnings (our progress is the metrics log)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def simulate(
    server: ServerSettings,
    client: ClientSettings,
    num_clients: int,
    cpus: int | None = None,
    cpus_per_client: float = 1.0,
) -> Path:
    """Run ``server.recipe`` on Flower's Simulation Engine (Ray backend): one virtual SuperNode per
    client, ``cpus / cpus_per_client`` of them at a time. Returns the run folder; raises the
    server's error (a :class:`~fedmoe.errors.FedMoeError` keeps its exit code)."""
    from flwr.simulation import run_simulation

    _quiet()
    total = cpus or max(1, os.cpu_count() or 1)
    outcome = Outcome()
    run_simulation(
        server_app=make_server_app(server, outcome),
        client_app=make_client_app(client),
        num_supernodes=num_clients,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": total,
                "num_gpus": 0,
                "logging_level": "ERROR",
                "log_to_driver": False,
            },
        },
    )
    if outcome.error is not None:
        raise outcome.error
    if outcome.folder is None:
        raise RuntimeError("the Flower simulation ended without running the server app")
    return outcome.folder
