"""Engram conditional memory: hashed N-gram lookup tables and the gate that fuses their rows into the residual streams.

Three separable parts, because in the distributed runtime each lives in a different process:
- `EngramHasher` (numpy, attention worker): raw token ids -> canonical ids -> per-head table indices. Reproduces
  DeepSeek's official demo (`engram_demo_v1.py`: `CompressedTokenizer`, `NgramHashMapping`) bit for bit.
- `EngramMemory` (torch, Engram service): indices -> concatenated table rows.
- `EngramGate` (torch, attention worker): rows + residual streams -> updated streams (runs before the attention).

Shape legend: B = batch, T = tokens, S = hc_mult residual streams, D = hidden, O = N-gram orders (N-1),
H = hash heads per order, E = engram_dim = O*H*head_dim, K = conv kernel, P = (K-1)*dilation conv look-back.
See docs/engram.md.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moemesh.kernels import fast_paths
from moemesh.kernels.config import ModelConfig

_SENTINEL = "\ue000"         # stands in for a lone space while the normalizer strips
_LAYER_SEED_PRIME = 10007    # per-layer seed stride of the demo's multiplier generator
_GATE_FLOOR = 1e-6           # |s| floor under the sqrt, as the demo (keeps the gradient finite at 0)


# ---- tokenizer compression ------------------------------------------------------------------------------------------
def _text_normalizer():
    """The demo's text-equivalence normalizer: NFKC, strip accents, lower-case, collapse whitespace, strip (a token
    that is only whitespace keeps one space)."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])


def build_compression_table(tokenizer_dir: str | Path) -> np.ndarray:
    """Raw id -> canonical id (int64 [V], V = vocabulary with added tokens) from a `tokenizer.json` (or its folder).

    Each id is decoded alone (special tokens kept, no clean-up); ids whose text holds U+FFFD (partial UTF-8) keep
    their token string as key, others the normalized text (or the raw text if that normalizes to ""). Canonical ids
    are numbered by first appearance in raw-id order, as the demo does."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"tokenizer_dir: no tokenizer.json at {path}")
    tok = Tokenizer.from_file(str(path))
    norm = _text_normalizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    texts = tok.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
    key_to_new: dict = {}
    table = np.empty(vocab, dtype=np.int64)
    for tid, text in enumerate(texts):
        if "\ufffd" in text:
            key = tok.id_to_token(tid)
        else:
            key = norm.normalize_str(text) or text
        table[tid] = key_to_new.setdefault(key, len(key_to_new))
    return table


# ---- prime table sizes ----------------------------------------------------------------------------------------------
def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for n < 3.3e24, far beyond any table size)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in bases:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@lru_cache(maxsize=16)
def _prime_tables(vocab_sizes: tuple[int, ...], n_heads: int, layer_ids: tuple[int, ...]) -> dict:
    """{layer: ((prime per head) per order)}: the demo's search. Layers in the given order, orders 2..N, heads in
    order; each head takes the smallest prime above the previous one (the order's base size - 1 for the first head)
    that no earlier (layer, order, head) took, so every table size is distinct."""
    seen: set[int] = set()
    out = {}
    for layer in layer_ids:
        orders = []
        for base in vocab_sizes:
            start, heads = base - 1, []
            for _ in range(n_heads):
                cand = start + 1
                while cand in seen or not _is_prime(cand):
                    cand += 1
                seen.add(cand)
                heads.append(cand)
                start = cand
            orders.append(tuple(heads))
        out[layer] = tuple(orders)
    return out


def engram_table_sizes(cfg: ModelConfig, layer: int) -> list[int]:
    """Prime table sizes of one Engram layer, order-major head-minor (O*H entries). Needs no tokenizer."""
    if layer not in cfg.engram_layer_ids:
        raise ValueError(f"layer: {layer} is not in engram_layer_ids {cfg.engram_layer_ids}")
    tables = _prime_tables(tuple(cfg.engram_vocab_size), cfg.engram_n_heads, tuple(cfg.engram_layer_ids))
    return [p for order in tables[layer] for p in order]


def engram_param_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple]:
    """Tensor shapes of one Engram layer by suffix (the checkpoint name is `layers.{layer}.engram.<suffix>`).

    `embed.weight` holds every head's table stacked (head j's rows start at the sum of the earlier sizes) and is
    owned by `EngramMemory`; the rest belongs to `EngramGate`."""
    D, S, E = cfg.hidden_size, cfg.hc_mult, cfg.engram_dim
    shapes = {
        "embed.weight": (sum(engram_table_sizes(cfg, layer)), cfg.engram_head_dim),
        "value_proj.weight": (D, E),
        "key_proj.weight": (S * D, E),
        "key_norm.weight": (D,),
        "query_norm.weight": (D,),
    }
    if cfg.engram_gate_form == "paper":
        shapes["conv_norm.weight"] = (S, D)
        shapes["conv.weight"] = (S * D, cfg.engram_kernel_size)
    return shapes


# ---- hashing --------------------------------------------------------------------------------------------------------
def _layer_multipliers(seed: int, layer: int, max_ngram: int, compressed_vocab: int) -> np.ndarray:
    """The demo's odd multipliers (int64 [N]): drawn below max_int64 // compressed_vocab, so tok * m never overflows
    for canonical ids (and XORs of non-negative int64 stay non-negative)."""
    half_bound = max(1, (int(np.iinfo(np.int64).max) // compressed_vocab) // 2)
    rng = np.random.default_rng(int(seed + _LAYER_SEED_PRIME * int(layer)))
    return rng.integers(low=0, high=half_bound, size=(max_ngram,), dtype=np.int64) * 2 + 1


def _as_ids(ids, name: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected token ids of shape [B, T], got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer token ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class EngramHasher:
    """Token ids -> per-layer Engram table indices, exactly as DeepSeek's demo computes them.

    For layer l, order n in 2..N and head j: `idx = (XOR_{k<n} tok_{t-k} * m_l[k]) mod p_{l,n,j}` on canonical ids
    (int64, numpy's wrapping arithmetic and floor modulo), positions before the start reading the canonical pad id."""

    def __init__(self, lookup_table: np.ndarray, *, vocab_sizes: list[int], max_ngram_size: int, n_heads: int,
                 layer_ids: list[int], pad_id: int, seed: int):
        """`lookup_table`: raw id -> canonical id (see `build_compression_table`); `vocab_sizes`: base table size per
        order 2..N; `pad_id`: raw id read before the sequence start."""
        if max_ngram_size < 2:
            raise ValueError(f"max_ngram_size: must be >= 2, got {max_ngram_size}")
        if len(vocab_sizes) != max_ngram_size - 1:
            raise ValueError(f"vocab_sizes: needs {max_ngram_size - 1} entries (orders 2..{max_ngram_size}), "
                             f"got {vocab_sizes!r}")
        if n_heads < 1 or not layer_ids:
            raise ValueError(f"n_heads/layer_ids: need >= 1 head and >= 1 layer, got {n_heads}, {layer_ids!r}")
        self.lookup_table = np.asarray(lookup_table, dtype=np.int64)
        if not 0 <= pad_id < len(self.lookup_table):
            raise ValueError(f"pad_id: {pad_id} outside the vocabulary 0..{len(self.lookup_table) - 1}")
        self.max_ngram_size, self.n_heads, self.layer_ids = max_ngram_size, n_heads, list(layer_ids)
        self.compressed_vocab_size = int(self.lookup_table.max()) + 1
        self.compressed_pad_id = int(self.lookup_table[pad_id])
        self.multipliers = {l: _layer_multipliers(seed, l, max_ngram_size, self.compressed_vocab_size)
                            for l in self.layer_ids}
        tables = _prime_tables(tuple(int(v) for v in vocab_sizes), n_heads, tuple(self.layer_ids))
        self._primes = {l: np.array(tables[l], dtype=np.int64) for l in self.layer_ids}   # [O, H]

    @classmethod
    def from_config(cls, config: dict, tokenizer_dir: str | Path) -> "EngramHasher":
        """From the demo's config keys: engram_vocab_size, max_ngram_size, n_head_per_ngram, layer_ids, pad_id, seed."""
        keys = ("engram_vocab_size", "max_ngram_size", "n_head_per_ngram", "layer_ids", "pad_id", "seed")
        missing = [k for k in keys if k not in config]
        if missing:
            raise ValueError(f"config: missing key(s) {missing}")
        return cls(build_compression_table(tokenizer_dir), vocab_sizes=list(config["engram_vocab_size"]),
                   max_ngram_size=int(config["max_ngram_size"]), n_heads=int(config["n_head_per_ngram"]),
                   layer_ids=[int(l) for l in config["layer_ids"]], pad_id=int(config["pad_id"]),
                   seed=int(config["seed"]))

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, tokenizer_dir: str | Path) -> "EngramHasher":
        """From a ModelConfig's engram_* fields."""
        if not cfg.has_engram:
            raise ValueError("cfg: engram_layer_ids is empty, the model has no Engram layers")
        return cls(build_compression_table(tokenizer_dir), vocab_sizes=list(cfg.engram_vocab_size),
                   max_ngram_size=cfg.engram_max_ngram_size, n_heads=cfg.engram_n_heads,
                   layer_ids=list(cfg.engram_layer_ids), pad_id=cfg.engram_pad_id, seed=cfg.engram_seed)

    def table_sizes(self, layer_id: int) -> list[int]:
        """The layer's prime table sizes, order-major head-minor (O*H entries)."""
        return [int(p) for p in self._primes[self._layer(layer_id)].ravel()]

    def compressed_ids(self, ids) -> np.ndarray:
        """Raw ids [B, T] -> canonical ids (int64 [B, T]). Negative ids pass through unchanged, as in the demo."""
        x = _as_ids(ids, "ids")
        if x.size and x.max() >= len(self.lookup_table):
            raise ValueError(f"ids: {int(x.max())} outside the tokenizer vocabulary 0..{len(self.lookup_table) - 1}")
        return np.where(x >= 0, self.lookup_table[np.maximum(x, 0)], x)

    def hash(self, ids) -> dict[int, np.ndarray]:
        """Raw ids [B, T] (whole sequences from their start) -> {layer: int64 [B, T, O*H]}, order-major head-minor,
        each index within its head's own table."""
        x = self.compressed_ids(ids)
        history = np.full((x.shape[0], self.max_ngram_size - 1), self.compressed_pad_id, dtype=np.int64)
        return {l: self._hash_layer(x, history, l) for l in self.layer_ids}

    def hash_continuation(self, context_ids, new_ids) -> dict[int, np.ndarray]:
        """Indices of `new_ids` [B, T] only, given the raw ids that precede them in their sequences, `context_ids`
        [B, C]: at least the last N-1 of them, or (C < N-1) all of them from the sequence start. Equals
        `hash(concat(context, new))[:, C:]`."""
        ctx = self.compressed_ids(context_ids)
        x = self.compressed_ids(new_ids)
        if ctx.shape[0] != x.shape[0]:
            raise ValueError(f"context_ids: batch {ctx.shape[0]} differs from new_ids' batch {x.shape[0]}")
        look = self.max_ngram_size - 1
        pad = np.full((x.shape[0], max(0, look - ctx.shape[1])), self.compressed_pad_id, dtype=np.int64)
        history = np.concatenate([pad, ctx[:, ctx.shape[1] - min(look, ctx.shape[1]):]], axis=1)   # [B, N-1]
        return {l: self._hash_layer(x, history, l) for l in self.layer_ids}

    def _layer(self, layer_id: int) -> int:
        if layer_id not in self._primes:
            raise ValueError(f"layer_id: {layer_id} is not an Engram layer ({self.layer_ids})")
        return layer_id

    def _hash_layer(self, x: np.ndarray, history: np.ndarray, layer: int) -> np.ndarray:
        """x: canonical ids [B, T]; history: the N-1 canonical ids before x [B, N-1] -> int64 [B, T, O*H]."""
        B, T = x.shape
        look = self.max_ngram_size - 1
        full = np.concatenate([history, x], axis=1)               # [B, N-1+T]; token t sits at column t + N-1
        m = self.multipliers[layer]
        mix = x * m[0]                                           # int64, wraps like the demo
        mixes = []
        for k in range(1, self.max_ngram_size):                  # loop over orders, not tokens
            mix = np.bitwise_xor(mix, full[:, look - k: look - k + T] * m[k])
            mixes.append(mix)                                    # mix of order k+1
        mixes = np.stack(mixes, axis=-1)                         # [B, T, O]
        idx = mixes[..., None] % self._primes[layer]             # [B, T, O, H], floor modulo
        return idx.reshape(B, T, idx.shape[2] * idx.shape[3])


# ---- tables ---------------------------------------------------------------------------------------------------------
class EngramMemory(nn.Module):
    """One Engram layer's tables: every (order, head) table stacked in `embed.weight` [sum(sizes), head_dim].

    Tables of real models are huge (tens of GB per layer): build on `device="meta"` and load with
    `load_state_dict(..., assign=True)` to avoid allocating (and initialising) them twice."""

    def __init__(self, table_sizes: list[int], head_dim: int, *, dtype=None, device=None):
        super().__init__()
        if not table_sizes or min(table_sizes) < 1 or head_dim < 1:
            raise ValueError(f"table_sizes/head_dim: need positive sizes, got {table_sizes!r}, {head_dim}")
        self.head_dim = head_dim
        self.embed = nn.Embedding(sum(table_sizes), head_dim, dtype=dtype, device=device)
        offsets = np.concatenate([[0], np.cumsum(table_sizes)[:-1]])
        self.register_buffer("sizes", torch.tensor(table_sizes, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)

    @classmethod
    def from_config(cls, cfg: ModelConfig, layer: int, *, dtype=None, device=None) -> "EngramMemory":
        """The tables of Engram layer `layer` of `cfg`."""
        return cls(engram_table_sizes(cfg, layer), cfg.engram_head_dim, dtype=dtype, device=device)

    def lookup(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """Per-head indices int64 [N, O*H] (as `EngramHasher.hash` gives them) -> rows [N, O*H*head_dim], the heads'
        rows concatenated in order (leading dims other than N are kept too)."""
        hash_ids = torch.as_tensor(hash_ids, device=self.offsets.device)
        n_heads = self.sizes.numel()
        if hash_ids.dim() < 1 or hash_ids.shape[-1] != n_heads or hash_ids.is_floating_point():
            raise ValueError(f"hash_ids: expected integer ids of shape [N, {n_heads}], got "
                             f"{tuple(hash_ids.shape)} {hash_ids.dtype}")
        if hash_ids.numel() and ((hash_ids < 0).any() or (hash_ids >= self.sizes).any()):
            raise ValueError("hash_ids: an index lies outside its head's table")
        hash_ids = hash_ids.long()
        fast = fast_paths.engram_lookup(hash_ids, self.offsets, self.embed.weight)  # device kernel; None on the CPU
        if fast is not None:
            return fast
        rows = F.embedding(hash_ids + self.offsets, self.embed.weight)            # [N, O*H, head_dim]
        return rows.flatten(-2)


# ---- gate -----------------------------------------------------------------------------------------------------------
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Weighted RMSNorm over the last axis in float32 (float64 inputs stay float64); returns that precision."""
    dt = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dt)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight.to(dt)


def gate_alpha(streams: torch.Tensor, k: torch.Tensor, query_norm: torch.Tensor, key_norm: torch.Tensor,
               eps: float) -> torch.Tensor:
    """EngramGate's gate: streams, keys [T, S, D], norm weights [D] -> alpha [T, S, 1] in the streams' dtype (the
    reference of kernels/triton_engram.engram_gate)."""
    q = _rms_norm(streams, query_norm, eps)                                          # [T, S, D] float32
    kn = _rms_norm(k, key_norm, eps)
    s = (q * kn).sum(-1) / math.sqrt(streams.shape[-1])                              # [T, S]
    s = s.sign() * s.abs().clamp_min(_GATE_FLOOR).sqrt()
    return torch.sigmoid(s).to(streams.dtype).unsqueeze(-1)


class EngramGate(nn.Module):
    """Fuses retrieved rows into the residual streams of one Engram layer, before the block's attention.

    v = value_proj(rows) (shared), k_s = key_proj(rows)[s] (one key per stream),
    alpha_s = sigmoid(sign(x) sqrt(|x|)), x = <rmsnorm(h_s), rmsnorm(k_s)> / sqrt(D), and stream s gets `+ alpha_s v`.
    The `paper` form instead adds `u_s + SiLU(conv(rmsnorm(u_s)))` with u_s = alpha_s v, a causal depthwise conv per
    stream channel (kernel K, dilation N as in the paper), state carried across calls."""

    def __init__(self, cfg: ModelConfig, *, dtype=None, device=None):
        super().__init__()
        D, S, E = cfg.hidden_size, cfg.hc_mult, cfg.engram_dim
        self.dim, self.streams, self.engram_dim, self.eps = D, S, E, cfg.rms_norm_eps
        self.form = cfg.engram_gate_form
        kw = {"dtype": dtype, "device": device}
        self.value_proj = nn.Linear(E, D, bias=False, **kw)
        self.key_proj = nn.Linear(E, S * D, bias=False, **kw)
        self.key_norm = _Weight(torch.ones(D, **kw))
        self.query_norm = _Weight(torch.ones(D, **kw))
        if self.form == "paper":
            self.kernel, self.dilation = cfg.engram_kernel_size, cfg.engram_max_ngram_size
            self.conv_norm = _Weight(torch.ones(S, D, **kw))
            self.conv = _Weight(torch.randn(S * D, self.kernel, **kw) / math.sqrt(self.kernel))

    @property
    def conv_lookback(self) -> int:
        """P: tokens of conv input that `conv_state` carries (0 for the v4.1 form)."""
        return (self.kernel - 1) * self.dilation if self.form == "paper" else 0

    def forward(self, streams: torch.Tensor, rows: torch.Tensor, conv_state: torch.Tensor | None = None):
        """streams [T, S, D] and rows [T, E] of ONE sequence's next T tokens in order -> (streams_out [T, S, D],
        new_conv_state). conv_state (paper form): [P, S, D], the conv inputs of the sequence's previous P tokens
        (None at the sequence start = zeros). The v4.1 form ignores it and returns None."""
        T = self._check(streams, rows)
        dtype = streams.dtype
        rows = rows.to(dtype)
        v = F.linear(rows, self.value_proj.weight.to(dtype))                          # [T, D]
        k = F.linear(rows, self.key_proj.weight.to(dtype)).view(T, self.streams, self.dim)  # [T, S, D]
        if self.form != "paper":
            fast = fast_paths.engram_gate(streams, k, v, self.query_norm.weight, self.key_norm.weight,
                                        self.eps)  # fused device kernel; None on the CPU
            return (fast if fast is not None else streams + self._alpha(streams, k) * v[:, None, :]), None
        u = self._alpha(streams, k) * v[:, None, :]                                  # [T, S, D]
        y, new_state = self._short_conv(u, conv_state)
        return streams + u + y, new_state

    def _alpha(self, streams: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return gate_alpha(streams, k, self.query_norm.weight, self.key_norm.weight, self.eps)

    def _short_conv(self, u: torch.Tensor, state: torch.Tensor | None):
        """SiLU(causal depthwise dilated conv(rmsnorm(u))) [T, S, D], and the last P conv inputs [P, S, D]."""
        T, S, D = u.shape
        P, dil = self.conv_lookback, self.dilation
        x = _rms_norm(u, self.conv_norm.weight, self.eps).to(u.dtype)                # [T, S, D]
        if state is None:
            state = x.new_zeros(P, S, D)
        elif tuple(state.shape) != (P, S, D):
            raise ValueError(f"conv_state: expected shape {(P, S, D)}, got {tuple(state.shape)}")
        full = torch.cat([state.to(u.dtype), x], dim=0)                              # [P+T, S, D]
        w = self.conv.weight.to(u.dtype).view(S, D, self.kernel)                     # channel c = s*D + d
        y = sum(full[j * dil: j * dil + T] * w[..., j] for j in range(self.kernel))  # tap K-1 = current token
        return F.silu(y), full[full.shape[0] - P:]

    def _check(self, streams: torch.Tensor, rows: torch.Tensor) -> int:
        if streams.dim() != 3 or tuple(streams.shape[1:]) != (self.streams, self.dim) or streams.shape[0] < 1:
            raise ValueError(f"streams: expected [T>=1, {self.streams}, {self.dim}], got {tuple(streams.shape)}")
        if tuple(rows.shape) != (streams.shape[0], self.engram_dim):
            raise ValueError(f"rows: expected [{streams.shape[0]}, {self.engram_dim}], got {tuple(rows.shape)}")
        return streams.shape[0]


class _Weight(nn.Module):
    """Holds one parameter named `weight`, so checkpoint names read `<module>.weight`."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init)
