"""Memory-mapped view of a `curate tokenize` output directory (see pipeline/tokenize.py for the layout).

    tokens = PackedTokens("TOKDIR")
    tokens.domains, tokens.vocab_size, tokens.eos_id, tokens.bos_id
    tokens.train_tokens("C4")                      # length of C4's training stream
    tokens.train_window("C4", start, n)            # any n tokens of it, O(1) (a few slices)
    tokens.train_sequence("C4", j, seq_len)        # packed sequence j: tokens [j*L, j*L + L + 1)
    tokens.eval_sequences("C4", seq_len)           # [N, seq_len + 1] held-out windows

A domain's training stream is its shards with the evaluation documents cut out, read through the
`train/<domain>.segments.npy` table. Sequences of length L + 1 start every L tokens (inputs and
shifted targets share the boundary token), so every training token is a target exactly once per
epoch. A domain shorter than one sequence is read cyclically (its text repeats within a sequence).

Memory maps are opened lazily and dropped when pickled, so a PackedTokens travels to DataLoader
workers as a path and each worker maps the files itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import CurateError
from common.files import read_manifest


class PackedTokens:
    def __init__(self, tokdir: str | Path) -> None:
        self.root = Path(tokdir)
        self.manifest = read_manifest(self.root, "tokenize")
        self.dtype = np.dtype(self.manifest["dtype"])
        self._domains = self.manifest["domains"]
        self._maps: dict[str, list[np.memmap | None]] = {}
        self._segments: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._eval: dict[str, np.memmap | None] = {}

    # -- description ---------------------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        return list(self._domains)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    @property
    def bos_id(self) -> int | None:
        """BOS before every document, or None when the tokenizer uses none."""
        b = self.manifest.get("bos_id")
        return None if b is None else int(b)

    def train_tokens(self, domain: str) -> int:
        return int(self._info(domain)["train_tokens"])

    def num_sequences(self, domain: str, seq_len: int) -> int:
        """Packed training sequences per epoch (at least 1 when the domain has any tokens)."""
        n = self.train_tokens(domain)
        return 0 if n == 0 else max(1, (n - 1) // seq_len)

    # -- reading -------------------------------------------------------------------------------
    def train_window(self, domain: str, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens [start, start + length) of the domain's training stream (cyclic past its end)."""
        starts, segs = self._segment_table(domain)
        total = int(starts[-1])
        if total == 0:
            raise CurateError(f"domain {domain} has no training tokens")
        out = np.empty(length, dtype=np.int64) if out is None else out
        maps = self._shard_maps(domain)
        pos, filled = start % total, 0
        while filled < length:
            k = int(np.searchsorted(starts, pos, side="right")) - 1
            shard, s0, s1 = segs[k]
            begin = s0 + (pos - starts[k])
            take = min(length - filled, s1 - begin)
            out[filled:filled + take] = maps[shard][begin:begin + take]
            filled += take
            pos = (pos + take) % total
        return out

    def train_sequence(self, domain: str, index: int, seq_len: int, out: np.ndarray | None = None) -> np.ndarray:
        return self.train_window(domain, index * seq_len, seq_len + 1, out)

    def eval_sequences(self, domain: str, seq_len: int, max_sequences: int | None = None) -> np.ndarray:
        """Held-out windows [N, seq_len + 1] (int64) of the domain's evaluation documents."""
        data = self._eval_map(domain)
        n = 0 if data is None else (len(data) - 1) // seq_len
        if n == 0:
            raise CurateError(f"domain {domain} has {0 if data is None else len(data)} evaluation tokens, fewer "
                              f"than one sequence of {seq_len + 1}: re-run `curate tokenize` with a larger "
                              "--eval-tokens or use a shorter seq_len")
        if max_sequences is not None:
            n = min(n, max_sequences)
        idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        return data[idx].astype(np.int64)

    def shard_documents(self, domain: str, shard: str) -> list[np.ndarray]:
        """All documents of one shard (training and evaluation), in input order."""
        entries = {e["id"]: i for i, e in enumerate(self._info(domain)["shards"])}
        if shard not in entries:
            raise CurateError(f"domain {domain} has no shard {shard!r}")
        data = self._shard_maps(domain)[entries[shard]]
        offsets = np.load(self.root / self._info(domain)["shards"][entries[shard]]["file"].replace(".bin", ".idx.npy"))
        return [np.asarray(data[a:b]) if data is not None else np.zeros(0, self.dtype)
                for a, b in zip(offsets[:-1], offsets[1:])]

    # -- internals -----------------------------------------------------------------------------
    def _info(self, domain: str) -> dict:
        try:
            return self._domains[domain]
        except KeyError:
            raise CurateError(f"no domain {domain!r} in {self.root} (domains: {', '.join(self._domains)})") from None

    def _shard_maps(self, domain: str) -> list:
        maps = self._maps.get(domain)
        if maps is None:
            maps = [np.memmap(self.root / e["file"], dtype=self.dtype, mode="r") if e["tokens"] else None
                    for e in self._info(domain)["shards"]]
            self._maps[domain] = maps
        return maps

    def _segment_table(self, domain: str) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        table = self._segments.get(domain)
        if table is None:
            segs = np.load(self.root / self._info(domain)["train_segments"])
            starts = np.zeros(len(segs) + 1, dtype=np.int64)
            np.cumsum(segs[:, 2] - segs[:, 1], out=starts[1:])
            # Python ints: per-read arithmetic on numpy scalars costs more than the copy itself
            table = self._segments[domain] = (starts, [tuple(int(x) for x in row) for row in segs])
        return table

    def _eval_map(self, domain: str):
        if domain not in self._eval:
            info = self._info(domain)
            self._eval[domain] = (np.memmap(self.root / info["eval_file"], dtype=self.dtype, mode="r")
                                  if info["eval_tokens"] else None)
        return self._eval[domain]

    def __getstate__(self) -> dict:
        # never pickle the maps: numpy would copy the mapped data into the pickle
        state = self.__dict__.copy()
        state.update(_maps={}, _segments={}, _eval={})
        return state
