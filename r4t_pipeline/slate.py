"""The supervised anchor, in the manner of Spotify's prompt-to-slate diffusion: the same set denoiser trained
directly on the real training sets, with no FOLM and no reward: condition = E_q(the set's query), target = the
E_c rows of the set's items (K rows: a fixed random K of a larger set, a smaller one's rows cycled, as
synthesis completes a short fan-out). What R4T-Diffusion adds over it is what RL-compiled targets buy."""

from __future__ import annotations

import numpy as np

from r4t_pipeline.synth import cycle_rows


def supervised_targets(reference_ids: list[list[str]], item_ids: np.ndarray, item_vectors: np.ndarray, k: int,
                       seed: int = 0) -> np.ndarray:
    """(N, K, d) targets from N reference sets of item ids (every id must be in `item_ids`)."""
    position = {item_id: n for n, item_id in enumerate(item_ids.tolist())}
    rng = np.random.default_rng(seed)
    targets = []
    for row, ids in enumerate(reference_ids):
        missing = [i for i in ids if i not in position]
        if missing or not ids:
            raise ValueError(f"reference set {row}: " + (f"item ids {missing[:5]} are not in the catalog embeddings"
                                                         if missing else "empty"))
        rows = item_vectors[[position[i] for i in ids]]
        chosen = rows[rng.permutation(len(rows))[:k]] if len(rows) > k else cycle_rows(rows, k)
        targets.append(chosen)
    return np.stack(targets).astype(np.float32)
