"""Training order as a function of the global sample index, never of the rank.

A run's training stream is numbered over all workers: an optimizer step of a global batch of G
samples takes samples [step x G, (step + 1) x G), and which rank reads which slice of them does not
change what the step trains on. So a run resumed at another world size sees the same samples, in
the same order, as the uninterrupted run (text: data/text.py TokenWindows; images: StepBatches).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

DIGEST_MOD = 2**31 - 1
"""Sample digests are residues mod this prime (an all-reduced sum of them stays exact in float64)."""


def sample_digest(samples: np.ndarray, ids: np.ndarray) -> int:
    """A fingerprint of which item (``ids``) each global sample number (``samples``) was: parts from
    different ranks add up (mod :data:`DIGEST_MOD`) to the whole step's, so two runs that log the same
    digest trained on the same items in the same order."""
    s, i = np.asarray(samples, dtype=np.uint64) + np.uint64(1), np.asarray(ids, dtype=np.uint64) + np.uint64(1)
    mixed = s * np.uint64(2654435761) ^ i * np.uint64(40503)
    return int((mixed % np.uint64(DIGEST_MOD)).sum() % np.uint64(DIGEST_MOD))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of ``n`` items in ``epoch``: a permutation seeded by (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class StepBatches:
    """A DataLoader batch sampler: this rank's part of each optimizer step of an epoch.

    The epoch is :func:`epoch_permutation` of the dataset; step s takes its samples
    [s x G, (s + 1) x G) (the incomplete last step is dropped) and rank r the r-th of world_size equal
    slices. Replaces the DistributedSampler, whose order depends on the world size.
    """

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int):
        if global_batch % world_size:
            raise ValueError(f"a global batch of {global_batch} does not split over {world_size} workers")
        self.size, self.global_batch, self.rank, self.seed = size, global_batch, rank, seed
        self.batch = global_batch // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.global_batch

    def _mine(self) -> np.ndarray:
        """This rank's sample numbers within the epoch, in the order it trains on them."""
        steps = np.arange(len(self))[:, None] * self.global_batch + self.rank * self.batch
        return (steps + np.arange(self.batch)[None, :]).reshape(-1)

    def digest(self) -> int:
        """This rank's part of the epoch's :func:`sample_digest` (samples numbered over the whole run)."""
        mine = self._mine()
        order = epoch_permutation(self.seed, self.epoch, self.size)
        return sample_digest(self.epoch * len(self) * self.global_batch + mine, order[mine])

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.seed, self.epoch, self.size)
        yield from order[self._mine()].reshape(len(self), self.batch).tolist()
