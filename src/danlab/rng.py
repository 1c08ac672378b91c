"""Seeded random streams. Every random number in danlab comes from a `torch.Generator` derived here.

A `BatchRNG` gives each of the B experiments its own generator, so that a batched run draws exactly
the numbers that the same experiments draw one at a time (batched == sequential). Training, which
needs no such equivalence, uses one generator for the whole batch (faster).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, stream: str) -> int:
    """A stable 63-bit seed for the named stream of a configured seed."""
    digest = hashlib.sha256(f"{int(seed)}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_generator(seed: int, stream: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, stream))
    return g


class BatchRNG:
    """Random draws of shape (B, *shape).

    ids: one experiment id per batch row (rows with the same id draw the same numbers, which is how a
    tuning grid shares truth and observations across its points); None means one generator for all rows.
    """

    def __init__(self, seed: int, stream: str, B: int, ids: list[int] | None = None):
        self.B = B
        if ids is None:
            self.ids = None
            self.gens = [make_generator(seed, stream)]
        else:
            if len(ids) != B:
                raise ValueError(f"BatchRNG: {len(ids)} ids for a batch of {B}")
            self.ids = list(ids)
            uniq = sorted(set(self.ids))
            # row b draws from its id's generator: a gather unless the ids are already distinct and increasing
            self._row = None if self.ids == uniq else torch.tensor([uniq.index(i) for i in self.ids])
            self.gens = [make_generator(seed, f"{stream}/{i}") for i in uniq]

    def _draw(self, fn, shape, dtype, device):
        if self.ids is None:
            return fn(self.B, *shape, generator=self.gens[0], dtype=dtype).to(device)
        per = torch.stack([fn(*shape, generator=g, dtype=dtype) for g in self.gens])
        if self._row is not None:
            per = per[self._row]
        return per.to(device)

    def randn(self, *shape, dtype=torch.float64, device="cpu") -> torch.Tensor:
        return self._draw(torch.randn, shape, dtype, device)

    def rand(self, *shape, dtype=torch.float64, device="cpu") -> torch.Tensor:
        return self._draw(torch.rand, shape, dtype, device)

    def get_state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.gens]

    def set_state(self, states: list[torch.Tensor]) -> None:
        if len(states) != len(self.gens):
            raise ValueError(f"BatchRNG: {len(states)} saved generator states for {len(self.gens)} generators")
        for g, s in zip(self.gens, states):
            g.set_state(s)
