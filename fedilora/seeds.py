"""Every random choice of a run derives its seed from ``seed`` in params.yaml and its coordinates
(round, client, purpose), so reruns, resumed runs and worker processes draw the same numbers."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from the run seed and step coordinates (round, client, ...)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)
