"""The traffic ledger of one round: what the server moves, what peers move, and what FedAvg of the
whole model would have moved for the same clients (FedMoE-DA, arXiv 2411.02115, Sec. III-C: the
server handles only the small parts; experts travel peer to peer along the plan's edges)."""

from __future__ import annotations

from dataclasses import dataclass

from fedmoe.model.schema import PartSizes, Role
from fedmoe.plan.transfers import Transfer, Transfers


@dataclass(frozen=True)
class Ledger:
    """Bytes moved in one round."""

    clients: int  # participating clients
    server_up: int  # clients → server: shared parts and gates of every participant
    server_down: int  # server → clients: averaged shared parts (and gates when shared)
    plan_down: int  # server → clients: each client's rows of the sync plan
    p2p: int  # client → client: experts along the transfer list
    fedavg_equivalent: int  # whole model up and down for every client
    max_client_p2p_in: int  # the largest peer-to-peer download of one client

    @property
    def server_total(self) -> int:
        """Everything through the server."""
        return self.server_up + self.server_down + self.plan_down

    def to_dict(self) -> dict[str, int | float]:
        """JSON-ready, with the ratios people ask for."""
        fedavg = max(self.fedavg_equivalent, 1)
        return {
            "clients": self.clients,
            "server_up": self.server_up,
            "server_down": self.server_down,
            "plan_down": self.plan_down,
            "server_total": self.server_total,
            "p2p": self.p2p,
            "max_client_p2p_in": self.max_client_p2p_in,
            "fedavg_equivalent": self.fedavg_equivalent,
            "server_vs_fedavg": round(self.server_total / fedavg, 6),
            "total_vs_fedavg": round((self.server_total + self.p2p) / fedavg, 6),
        }


def traffic_ledger(
    sizes: PartSizes,
    clients: list[int],
    transfers: Transfers | list[Transfer],
    plan_bytes: dict[int, int],
    gate_shared: bool,
) -> Ledger:
    """Count one FedMoE-DA round.

    Parameters
    ----------
    sizes
        Byte sizes of the model's parts.
    clients
        Participating client ids.
    transfers
        The peer-to-peer transfer list.
    plan_bytes
        Client id → bytes of the plan rows the server sends it.
    gate_shared
        Whether the server averages G and sends it back (else each client keeps its own gate).
    """
    n = len(clients)
    table = transfers if isinstance(transfers, Transfers) else Transfers.of(list(transfers))
    per_in = table.received()
    return Ledger(
        clients=n,
        server_up=n * sizes.server_part,
        server_down=n * (sizes.shared + (sizes.gate if gate_shared else 0)),
        plan_down=sum(plan_bytes.get(c, 0) for c in clients),
        p2p=int(table.bytes.sum()),
        fedavg_equivalent=2 * n * sizes.model,
        max_client_p2p_in=max(per_in.values(), default=0),
    )


def server_ledger(sizes: PartSizes, n: int, moves: frozenset[Role]) -> Ledger:
    """Traffic of a server-mediated baseline: the parts in ``moves`` up and down for each of the
    ``n`` participants (every part: FedAvg; the shared parts: FedPer; none: local training)."""
    part = {Role.SHARED: sizes.shared, Role.GATE: sizes.gate, Role.EXPERT: sizes.experts}
    one_way = n * sum(part[r] for r in moves)
    return Ledger(n, one_way, one_way, 0, 0, 2 * n * sizes.model, 0)
