"""The check for clients too small to train or test on: a warning, never an error."""

from __future__ import annotations

from collections.abc import Sequence

from fedmoe.partition.pipeline import ClientSplit

MIN_TRAIN = 10  # default: fewer local training samples than this is warned about
MIN_TEST = 5  # default: fewer local test samples than this is warned about
SMALL_HINT = "use fewer clients, a larger --alpha or --min-size, or another --scheme"


def small_clients(clients: Sequence[ClientSplit], min_train: int, min_test: int) -> str | None:
    """One sentence naming how many clients fall below ``min_train`` training or ``min_test``
    local-test samples and the smallest counts; None when none does.

    A minimum of 0 turns its check off (a split made with ``local_test = 0`` passes 0 for the
    test minimum: it has no local test sets on purpose).
    """
    if not clients:
        return None
    trains = [int(c.train.size) for c in clients]
    tests = [int(c.test.size) for c in clients]
    small = sum(1 for a, b in zip(trains, tests, strict=True) if a < min_train or b < min_test)
    if small == 0:
        return None
    wants = [
        f"{min_train} train" if min_train > 0 else "",
        f"{min_test} test" if min_test > 0 else "",
    ]
    return (
        f"{small} of {len(clients)} clients have fewer than {' or '.join(w for w in wants if w)} "
        f"samples (smallest: {min(trains)} train, {min(tests)} test); their accuracies will be "
        "noisy"
    )
