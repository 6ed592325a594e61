"""fedmoe on Flower (``pip install 'fedmoe[flower]'``): FedMoE-DA and every baseline of
``fedmoe run`` as a Flower app, on the Simulation Engine or the Deployment Engine, with experts
exchanged peer to peer through an exchange location the server never reads.

- :mod:`~fedmoe.flower.server`: the ``ServerApp`` (rounds, plans, metrics; small parts only).
- :mod:`~fedmoe.flower.client`: the ``ClientApp`` (training, publishing, fetching, merging,
  evaluating).
- :mod:`~fedmoe.flower.wire`: how a round travels in Flower messages.
- :mod:`~fedmoe.flower.launch`: a local simulation or deployment of a recipe (``fedmoe flower``).
"""

from pathlib import Path

APP_DIR = Path(__file__).parent / "app"  # the Flower app's pyproject.toml, for ``flwr run``
