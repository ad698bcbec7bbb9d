"""Which domain and which packed sequence feed global sample i: a pure function of the seed and
the weight history, computed in the main process so that DataLoader workers only read.

For global sample i (counted over all ranks, from the start of training):

  - u_i = uniform draw number (i mod 4096) of the PCG64 stream seeded by (seed, i // 4096), so any
    sample's draw is known without replaying the ones before it;
  - domain d_i = the bucket of u_i in the cumulative weights in effect at i (the weights of the
    last update made before sample i was drawn);
  - its position within the domain, p = how many samples before i chose d_i (the domain's cursor);
    epoch e = p // N_d, sequence = permutation_e(d_i)[p mod N_d], where permutation_e is a fresh
    shuffle of the domain's N_d sequences per epoch, seeded by (seed, domain name, e).

`PlanState` (sample count and per-domain cursors) is the whole state; the random draws need none.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

BLOCK = 4096
_DRAW_TAG, _PERM_TAG = 0x5EED_D0, 0x5EED_E0   # keep the two random streams independent


@dataclass(frozen=True)
class PlanState:
    sample: int              # global samples planned so far
    counts: tuple[int, ...]  # sequences taken per domain so far (over all epochs)


class Schedule:
    def __init__(self, seed: int, domains: list[str], num_sequences: list[int]) -> None:
        if any(n < 1 for n in num_sequences):
            raise ValueError("every domain of a schedule needs at least one sequence")
        self.seed, self.domains, self.num_sequences = seed, list(domains), [int(n) for n in num_sequences]
        self._block: tuple[int, np.ndarray] | None = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def start(self) -> PlanState:
        return PlanState(0, (0,) * len(self.domains))

    def uniforms(self, start: int, n: int) -> np.ndarray:
        """u_i for i in [start, start + n)."""
        out = np.empty(n)
        i = 0
        while i < n:
            b, off = divmod(start + i, BLOCK)
            take = min(n - i, BLOCK - off)
            out[i:i + take] = self._draws(b)[off:off + take]
            i += take
        return out

    def permutation(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        perm = self._perms.get(key)
        if perm is None:
            # drop this domain's older epochs: a batch straddles at most a few consecutive ones
            for old in [k for k in self._perms if k[0] == d and k[1] < epoch - 1]:
                del self._perms[old]
            n = self.num_sequences[d]
            seq = np.random.SeedSequence([self.seed, _PERM_TAG, zlib.crc32(self.domains[d].encode()), epoch])
            perm = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
            np.random.Generator(np.random.PCG64(seq)).shuffle(perm)
            self._perms[key] = perm
        return perm

    def plan(self, state: PlanState, cdf: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, PlanState]:
        """The next n samples after `state` under cumulative weights `cdf`:
        (domain index [n], sequence index [n], state after them)."""
        doms = np.minimum(np.searchsorted(cdf, self.uniforms(state.sample, n), side="right"), len(cdf) - 1)
        seqs = np.empty(n, dtype=np.int64)
        counts = list(state.counts)
        for d in np.unique(doms):
            at = np.flatnonzero(doms == d)
            pos = counts[d] + np.arange(len(at))
            counts[d] += len(at)
            epochs, within = np.divmod(pos, self.num_sequences[d])
            for e in np.unique(epochs):
                m = epochs == e
                seqs[at[m]] = self.permutation(int(d), int(e))[within[m]]
        return doms, seqs, PlanState(state.sample + n, tuple(counts))

    def _draws(self, block: int) -> np.ndarray:
        if self._block is None or self._block[0] != block:
            seq = np.random.SeedSequence([self.seed, _DRAW_TAG, block])
            self._block = (block, np.random.Generator(np.random.PCG64(seq)).random(BLOCK))
        return self._block[1]


def cumulative(weights: list[float]) -> np.ndarray:
    """Cumulative distribution of weights, ending exactly at 1."""
    w = np.asarray(weights, dtype=np.float64)
    cdf = np.cumsum(w / w.sum())
    cdf[-1] = 1.0
    return cdf
