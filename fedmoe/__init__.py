"""fedmoe: federated Mixture-of-Experts with domain-aware, fine-grained expert aggregation.

The method is FedMoE-DA (Zhan et al., arXiv 2411.02115). The package is a pure core: every function
takes and returns in-memory objects; only :mod:`fedmoe.io` touches the disk. The command-line tool
lives in the separate ``fedmoe_cli`` package.
"""

__version__ = "0.1.0"
