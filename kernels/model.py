"""DeepSeek-V4 (+ Engram) as one plain PyTorch module: the single-process reference path.

A step runs on a flat batch of tokens from any number of sequences (prefill chunks and decode tokens alike), each
sequence carrying its own `SequenceCache`; projections, mHC and MoE run over all tokens at once, attention per
sequence. `forward` and `generate` wrap that for the familiar [B, T] interface.
Shapes: N = tokens of the step, hc = residual streams, D = hidden, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moemesh.kernels.attention import Attention, Segment
from moemesh.kernels.config import ModelConfig
from moemesh.kernels.decode_state import SequenceCache
from moemesh.kernels.engram import EngramGate, EngramHasher, EngramMemory
from moemesh.kernels.mhc import HyperConnection, HyperHead, merge_streams
from moemesh.kernels.moe import MoE
from moemesh.kernels.norms import RMSNorm
from moemesh.kernels.rope import Rotary
from moemesh.kernels.sampling import SamplingParams, sample


@dataclass
class StepInput:
    """One step's flat batch: N tokens of several sequences (see `DeepseekV4.begin_step`)."""

    token_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    segments: list[Segment]
    engram_rows: dict[int, torch.Tensor]  # {Engram layer: [N, engram_dim]}
    streams: torch.Tensor  # [N, hc, D] embedded input
    new_tokens: list[list[int]]


class Block(nn.Module):
    """One decoder layer: [Engram] -> mHC -> attention -> mHC -> MoE, on hc residual streams. It has no
    `forward`: the MoE is the driver's (local or remote), so `DeepseekV4.layer_loop` strings the parts together."""

    def __init__(self, cfg: ModelConfig, layer: int, rotary: dict[str, Rotary], with_experts: bool = True,
                 with_engram_tables: bool = True):
        super().__init__()
        self.layer = layer
        self.engram = EngramGate(cfg) if layer in cfg.engram_layer_ids else None
        self.engram_memory = (EngramMemory.from_config(cfg, layer)
                              if self.engram is not None and with_engram_tables else None)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_attn = HyperConnection(cfg)
        self.hc_ffn = HyperConnection(cfg)
        self.attn = Attention(cfg, layer, rotary)
        self.ffn = MoE(cfg, layer, with_experts)

    def before_moe(self, streams: torch.Tensor, step: StepInput):
        """Everything up to the MoE input: [Engram], mHC, attention, mHC -> (streams, post, comb, x [N, D]).
        The MoE output y [N, D] then goes back in with `merge_streams(streams, y, post, comb)` (see
        `DeepseekV4.layer_loop`, the one place that does both)."""
        if self.engram is not None:
            streams = self._add_memory(streams, step.engram_rows.get(self.layer), step.segments)
        post, comb, x = self.hc_attn(streams)
        streams = merge_streams(streams, self.attn(self.attn_norm(x), step.positions, step.segments), post, comb)
        post, comb, x = self.hc_ffn(streams)
        return streams, post, comb, self.ffn_norm(x)

    def _add_memory(self, streams: torch.Tensor, rows: torch.Tensor | None, segments: list[Segment]) -> torch.Tensor:
        if rows is None:
            raise ValueError(f"engram_rows: layer {self.layer} is an Engram layer and needs its retrieved rows")
        if self.engram.conv_lookback == 0:  # stateless form: every token at once
            return self.engram(streams, rows)[0]
        out = torch.empty_like(streams)
        for seg in segments:  # the paper form's causal conv runs along each sequence
            cache = seg.cache.layers[self.layer]
            out[seg.slice], cache.engram_conv = self.engram(streams[seg.slice], rows[seg.slice], cache.engram_conv)
        return out


class DeepseekV4(nn.Module):
    """The whole model. Parameter names follow the checkpoint's (see `checkpoint_name`)."""

    def __init__(self, cfg: ModelConfig, with_experts: bool = True, with_engram_tables: bool = True,
                 engram_hasher: EngramHasher | None = None):
        super().__init__()
        self.config = cfg
        self.engram_hasher = engram_hasher  # needs the tokenizer; set by load_model
        D, V = cfg.hidden_size, cfg.vocab_size
        rotary = {"main": Rotary(cfg, "main"), "compress": Rotary(cfg, "compress")}
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList(Block(cfg, i, rotary, with_experts, with_engram_tables)
                                    for i in range(cfg.num_hidden_layers))
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.head = nn.Linear(D, V, bias=False)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self) -> SequenceCache:
        return SequenceCache(layers=[b.attn.new_cache(self.dtype, self.device) for b in self.layers])

    # ---- the step --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, token_ids: Sequence[Sequence[int]], caches: Sequence[SequenceCache],
             engram_rows: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Feed each sequence its next tokens (any count >= 1) -> final hidden states of every token [N, D],
        sequence after sequence. Advances every cache.

        `engram_rows` ({layer: [N, engram_dim]}) comes from an Engram service; without it, Engram layers look up
        their local tables. Either way the indices depend only on the tokens, so they are ready before layer 0."""
        step = self.begin_step(token_ids, caches, engram_rows)
        loop, y = self.layer_loop(step), None
        while True:
            try:
                block, x = loop.send(y)
            except StopIteration as done:
                return self.end_step(step, done.value)
            y = block.ffn(x, step.token_ids)  # the local MoE: routed experts held here + shared expert

    def begin_step(self, token_ids: Sequence[Sequence[int]], caches: Sequence[SequenceCache],
                   engram_rows: dict[int, torch.Tensor] | None = None) -> StepInput:
        """Validate and flatten the step's tokens, look up Engram rows if needed, embed -> the layer loop's input."""
        if len(token_ids) != len(caches):
            raise ValueError(f"token_ids: {len(token_ids)} sequences but {len(caches)} caches")
        segments, start = [], 0
        for ids, cache in zip(token_ids, caches):
            if len(ids) == 0:
                raise ValueError("token_ids: every sequence needs at least one new token")
            segments.append(Segment(start, len(ids), cache))
            start += len(ids)
        flat = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long, device=self.device)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.config.vocab_size):
            raise ValueError(f"token_ids: ids must be in [0, {self.config.vocab_size}), got {int(flat.min())}.."
                             f"{int(flat.max())}")
        positions = torch.cat([torch.arange(c.length, c.length + s.length, device=self.device)
                               for c, s in zip(caches, segments)])
        if self.config.has_engram and engram_rows is None:
            engram_rows = self.lookup_engram(self.engram_hash_ids(token_ids, caches))
        streams = self.embed(flat).unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()
        return StepInput(flat, positions, segments, engram_rows or {}, streams, [list(ids) for ids in token_ids])

    def layer_loop(self, step: StepInput) -> Generator[tuple[Block, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The layer loop with the MoE left to the driver, the only part that differs between the single-process
        step (`step`, local experts) and the attention worker's (`RemoteStep`, experts in other processes).

        Per block: yields `(block, x)` at its MoE input, takes the MoE output (routed + shared) back through
        `send(y)`, merges it into the residual streams. Returns (StopIteration.value) the final streams for
        `end_step`. Prime it with `send(None)`.
        N = tokens, hc = residual streams, D = hidden: x, y [N, D]; streams [N, hc, D]."""
        streams = step.streams  # [N, hc, D]
        for block in self.layers:
            streams, post, comb, x = block.before_moe(streams, step)  # x [N, D]
            y = yield block, x  # [N, D]
            streams = merge_streams(streams, y, post, comb)
        return streams

    def end_step(self, step: StepInput, streams: torch.Tensor) -> torch.Tensor:
        """Advance the caches' bookkeeping; final streams [N, hc, D] -> hidden states [N, D]."""
        for seg, ids in zip(step.segments, step.new_tokens):
            seg.cache.length += len(ids)
            seg.cache.token_ids.extend(int(t) for t in ids)
        return self.norm(self.hc_head(streams))

    def engram_hash_ids(self, token_ids: Sequence[Sequence[int]], caches: Sequence[SequenceCache]
                        ) -> dict[int, torch.Tensor]:
        """{Engram layer: table indices [N, orders*heads]} for the step's tokens (each sequence's history from its
        cache)."""
        if self.engram_hasher is None:
            raise ValueError("engram_hasher: this model has Engram layers but no hasher (load it with load_model, "
                             "which builds one from the checkpoint's tokenizer.json)")
        look = self.config.engram_max_ngram_size - 1
        per_seq = [self.engram_hasher.hash_continuation([c.token_ids[max(0, len(c.token_ids) - look):]], [list(ids)])
                   for ids, c in zip(token_ids, caches)]
        return {layer: torch.from_numpy(np.concatenate([h[layer][0] for h in per_seq])).to(self.device)
                for layer in self.config.engram_layer_ids}

    def lookup_engram(self, hash_ids: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Rows from this process's own tables (the single-process path)."""
        blocks = {b.layer: b for b in self.layers}
        missing = [l for l in hash_ids if blocks[l].engram_memory is None]
        if missing:
            raise ValueError(f"engram_rows: layers {missing} hold no tables here; pass rows from the Engram service")
        return {l: blocks[l].engram_memory.lookup(ids) for l, ids in hash_ids.items()}

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()

    # ---- [B, T] interface --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                caches: list[SequenceCache] | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (float32). With `attention_mask` [B, T] (1 = token), each row's tokens
        must be contiguous (left or right padding); padded positions get logits 0. Pass `caches` (one per row, from
        `new_cache`) to continue sequences; without, every row starts fresh."""
        rows = _rows(input_ids, attention_mask)
        caches = caches if caches is not None else [self.new_cache() for _ in rows]
        hidden = self.step([ids for ids, _ in rows], caches)
        out = torch.zeros(*input_ids.shape, self.config.vocab_size, dtype=torch.float32, device=self.device)
        start = 0
        for b, (ids, span) in enumerate(rows):
            out[b, span] = self.logits(hidden[start:start + len(ids)])
            start += len(ids)
        return out

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16, attention_mask: torch.Tensor | None = None,
                 sampling: SamplingParams | None = None, eos_token_id: int | list[int] | None = -1) -> torch.Tensor:
        """Greedy by default (pass `sampling` for temperature / top-k / top-p / seed). Uses the KV cache: one prefill,
        then one token per step. Returns [B, T + max_new_tokens]: each row's prompt, then its new tokens right after
        its last prompt token, padded with the pad id (or eos) after it stops. `eos_token_id` -1 means the config's."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        sampling = sampling or SamplingParams()
        eos = self.config.eos_token_id if eos_token_id == -1 else eos_token_id
        eos = set([eos] if isinstance(eos, int) else eos or [])
        rows = _rows(input_ids, attention_mask)
        caches = [self.new_cache() for _ in rows]
        generator = sampling.generator(self.device)
        seqs = [list(ids) for ids, _ in rows]
        new = [[] for _ in rows]
        live = list(range(len(rows)))
        feed = [seqs[b] for b in live]
        while live and max_new_tokens:
            hidden = self.step(feed, [caches[b] for b in live])
            last = torch.cumsum(torch.tensor([len(f) for f in feed]), 0) - 1
            tokens = sample(self.logits(hidden[last.to(self.device)]), sampling, generator).tolist()
            for b, t in zip(live, tokens):
                new[b].append(t)
            live = [b for b, t in zip(live, tokens) if t not in eos and len(new[b]) < max_new_tokens]
            feed = [[new[b][-1]] for b in live]
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else (min(eos) if eos else 0)
        out = torch.full((len(rows), input_ids.shape[1] + max_new_tokens), pad, dtype=torch.long)
        for b, (s, n) in enumerate(zip(seqs, new)):
            out[b, : len(s) + len(n)] = torch.tensor(s + n, dtype=torch.long)
        return out.to(input_ids.device)


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple[list[int], slice]]:
    """Each row's real tokens and where they sit."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [B, T], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return [(row.tolist(), slice(0, input_ids.shape[1])) for row in input_ids]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    rows = []
    for b, (ids, mask) in enumerate(zip(input_ids, attention_mask.bool())):
        where = mask.nonzero().squeeze(-1)
        if where.numel() == 0:
            raise ValueError(f"attention_mask: row {b} has no tokens")
        lo, hi = int(where[0]), int(where[-1]) + 1
        if hi - lo != where.numel():
            raise ValueError(f"attention_mask: row {b} has holes; tokens must be contiguous")
        rows.append((ids[lo:hi].tolist(), slice(lo, hi)))
    return rows


def load_model(path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               progress: bool | None = None, *, with_experts: bool = True,
               with_engram_tables: bool = True) -> DeepseekV4:
    """Load a DeepSeek-V4 checkpoint (HF layout) into the single-process model. `with_experts=False` /
    `with_engram_tables=False` leave out (and never read) the routed experts / Engram tables: an attention worker's
    share of the model."""
    from moemesh.kernels.loading import load_into

    return load_into(path, dtype=dtype, device=device, progress=progress, with_experts=with_experts,
                     with_engram_tables=with_engram_tables)
