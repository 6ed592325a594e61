"""The steps of a round on files, shared by the commands and ``fedmoe run``: each step reads its
inputs through :mod:`fedmoe.io`, calls the pure core (:mod:`fedmoe.round`, the methods, the merge
engine) and writes its artefacts through the same :mod:`fedmoe.io` writers, so a round run by hand
through the CLI and the same round inside ``fedmoe run`` give the same bytes.

- :mod:`~fedmoe.pipeline.pool`: clients trained in worker processes, one thread each.
- :mod:`~fedmoe.pipeline.train`: one local round of some clients (``train-round``).
- :mod:`~fedmoe.pipeline.affinity`: the affinity artefact (``affinity``).
- :mod:`~fedmoe.pipeline.sync`: the sync plan (``plan-sync``).
- :mod:`~fedmoe.pipeline.merge`: the round's merge into every client's next model (``aggregate``).
"""
