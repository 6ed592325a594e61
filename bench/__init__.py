"""fedmoe benchmarks: every hot path against a physical limit and a peer, measured in the same run.

Run ``python -m bench`` (full) or ``python -m bench --quick`` (under a minute, a smoke test).
"""
