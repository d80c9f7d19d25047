"""Per-sequence decode state of a DeepSeek-V4 model.

For each layer a sequence keeps: the sliding window's last W-1 K=V entries; for CSA/HCA layers the compressor's pool
of compressed entries, the projected tokens of its unfinished window (buffer), and for CSA the previous window's
first series (overlap); for CSA the indexer's own compressed keys with the same buffer/overlap state; for Engram
layers of the paper form, the short conv's last inputs. Everything is plain tensors: the serving runtime's block
allocator decides where sequences live; this module only defines what a sequence needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class GrowableRows:
    """A [n, d] tensor appended to in amortised O(rows) (capacity doubles), for pools that grow every window."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str):
        self._data = torch.empty(0, dim, dtype=dtype, device=device)
        self.n = 0

    def append(self, rows: torch.Tensor) -> None:
        need = self.n + rows.shape[0]
        if need > self._data.shape[0]:
            grown = torch.empty(max(need, 2 * self._data.shape[0], 16), self._data.shape[1],
                                dtype=self._data.dtype, device=self._data.device)
            grown[: self.n] = self._data[: self.n]
            self._data = grown
        self._data[self.n: need] = rows
        self.n = need

    def view(self) -> torch.Tensor:
        return self._data[: self.n]

    def nbytes(self) -> int:
        return self.n * self._data.shape[1] * self._data.element_size()


@dataclass
class CompressorState:
    """State of one compressor (the main CSA/HCA one, or the CSA indexer's)."""

    entries: GrowableRows                       # [n, out] compressed, normed, rotated entries
    buf_kv: torch.Tensor | None = None           # [b < rate, width] projected tokens of the open window
    buf_gate: torch.Tensor | None = None         # [b, width] their gate logits (ape not yet added)
    overlap_kv: torch.Tensor | None = None       # CSA: [rate, out] first series of the last closed window
    overlap_gate: torch.Tensor | None = None     # CSA: [rate, out] its gate logits (ape added)

    @property
    def count(self) -> int:
        return self.entries.n


@dataclass
class LayerCache:
    window: torch.Tensor                         # [<= W-1, head_dim] last K=V entries (rotated)
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None
    engram_conv: torch.Tensor | None = None      # paper-form Engram: last conv inputs

    def nbytes(self) -> int:
        n = self.window.numel() * self.window.element_size()
        for st in (self.compressor, self.indexer):
            if st is not None:
                n += st.entries.nbytes()
        return n


@dataclass
class SequenceCache:
    """Everything one sequence needs to continue: per-layer state, how many tokens were seen, and the raw token ids
    (Engram hashes look back N-1 tokens)."""

    layers: list[LayerCache]
    length: int = 0
    token_ids: list[int] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
