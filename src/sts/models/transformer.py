"""One lean decoder-only transformer (Llama, Qwen2, Mistral) with a static, preallocated KV cache.

``forward(tokens, start_pos)`` is the only data path: it serves chunked prefill, one-token
decode and multi-token verification alike, for a batch of sequences at different positions.
Sequence ``b``'s tokens go to cache rows ``start_pos[b] + t``; rows past a sequence's length
are scratch (masked out, overwritten later), so rolling back rejected tokens is free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import os
from typing import Any, Callable, NamedTuple

from sts.attention.backend import KERNEL_MAX_TOKENS, AttentionFn, dense_attention
from sts.errors import STSError
from sts.models.config import ModelConfig


def fused_on_gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``fn``, compiled into one fused kernel for small-T CUDA inputs (decode and verify steps).

    A decode step is otherwise hundreds of tiny element-wise kernels whose launch gaps, even in a
    CUDA graph, cost as much as reading the weights. Prefill chunks and CPU runs stay eager (no
    compile time, no recompiles for every chunk length). ``STS_COMPILE=0`` turns it off.
    """
    compiled: list[Callable[..., Any]] = []

    def run(x: Tensor, *args: Any) -> Any:
        if x.is_cuda and x.shape[1] <= KERNEL_MAX_TOKENS and os.environ.get("STS_COMPILE", "1") != "0":
            if not compiled:
                # One specialisation per (batch, tokens, width) seen: decode, the draft's two-token
                # step and verification, for target and draft, at a few batch sizes.
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
                compiled.append(torch.compile(fn, dynamic=False, fullgraph=True))
            return compiled[0](x, *args)
        return fn(x, *args)

    run.__doc__ = fn.__doc__
    return run


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@fused_on_gpu
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Return x normalised by its root mean square (in float32, like the reference implementations), times weight."""
    return _rms_norm(x, weight, eps)


@fused_on_gpu
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Return ``(residual + x, rms_norm(residual + x))``: the residual stream and the next norm's output in one pass
    (vLLM's fused add + RMSNorm), where a layer would add, store, then read the sum back to normalise it."""
    total = residual + x
    return total, _rms_norm(total, weight, eps)


@fused_on_gpu
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Return silu(gate) * up."""
    return F.silu(gate) * up


class Linear(nn.Linear):
    """``nn.Linear`` that, on the CPU, runs 2-8 rows as one matrix-vector product each.

    MKL's GEMM packs the whole weight matrix on every call, so a verify or draft step of a few
    rows costs several times a GEMV per row (measured, fp32, 2 threads, 896 x 9728 weights: 2 rows
    14.5 ms as one GEMM vs 4.6 ms as two GEMVs; 5 rows 23.8 vs 11.8 ms; from about 10 rows on the
    GEMM wins). GPUs and longer inputs take the ordinary path.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x @ weight.T + bias`` for ``x`` ``[..., in]``."""
        rows = x.numel() // x.shape[-1]
        if x.is_cuda or rows < 2 or rows > 8:
            return super().forward(x)
        flat = x.reshape(rows, x.shape[-1])
        return torch.stack([super(Linear, self).forward(row) for row in flat]).view(*x.shape[:-1], -1)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Return the normalised input in its own dtype."""
        return rms_norm(x, self.weight, self.eps)


#: The 8-bit format of :meth:`KVCache.keep_score_keys`'s copy of K (3 mantissa bits; casts saturate at +-448).
SCORE_KEY_DTYPE = torch.float8_e4m3fn
#: Rows :meth:`KVCache.centre` converts at a time.
CENTRE_ROWS = 8192


class KVCache(nn.Module):
    """A layer's keys and values, ``[B, Hkv, S, D]`` each, preallocated to the maximum length; optionally an 8-bit
    copy of the keys for scoring (:meth:`keep_score_keys`)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        #: ``[B, Hkv, S, D]`` float8 e4m3 of each K row minus its slot's :attr:`key_mean`, written with K (None: none).
        self.score_keys: Tensor | None = None
        #: ``[B, Hkv, D]`` float32: each slot's mean K row per KV head, fixed by :meth:`centre` when a prompt is read.
        self.key_mean: Tensor | None = None

    def rows(self, slot: int | None = None) -> tuple[Tensor, Tensor]:
        """Return (K, V): the whole batch's cache, or one slot's ``[1, Hkv, S, D]`` view of it."""
        if slot is None:
            return self.k, self.v
        return self.k[slot : slot + 1], self.v[slot : slot + 1]

    def keep_score_keys(self, keep: bool) -> None:
        """Keep (allocate) or drop an 8-bit copy of K for scoring (half the bytes of 16-bit K): row ``i`` of a slot
        holds ``float8_e4m3(K[i] - mean)``, ``mean`` the slot's prompt's mean K row per KV head.

        Subtracting the mean changes no softmax over rows (``q . mean`` is one constant per query) but removes the
        component all rows share (e.g. Qwen's key bias), which would otherwise swamp the rows' differences in 3
        mantissa bits: on the demo draft's real keys at 8K, the centred copy (the queries rounded to float8 too, as
        the score kernel does) keeps 99.95% of the bf16 ranking's top-row score mass on average and 99.7% in the worst
        layer, raw float8 as little as 60-65% of the top rows at layer 0 (docs/results.md, first section)."""
        if not keep:
            self.score_keys = self.key_mean = None
        elif self.score_keys is None:
            self.score_keys = torch.zeros(self.k.shape, dtype=SCORE_KEY_DTYPE, device=self.k.device)
            self.key_mean = torch.zeros(*self.k.shape[:2], self.k.shape[3], dtype=torch.float32, device=self.k.device)

    def centre(self, slot: int, rows: int) -> None:
        """Fix slot ``slot``'s mean K row from its first ``rows`` rows (0: a zero mean) and rewrite their 8-bit copy
        (a no-op without the copy, :meth:`keep_score_keys`). Rows the slot writes later are centred on this mean as
        they come."""
        if self.score_keys is None or self.key_mean is None:
            return
        # In slices of rows: a float32 copy of a 128K prompt's keys would take 268 MB a layer.
        slices = [slice(lo, min(lo + CENTRE_ROWS, rows)) for lo in range(0, rows, CENTRE_ROWS)]
        keys = self.k[slot]
        mean = self.key_mean[slot]
        mean.zero_()
        for part in slices:
            mean.add_(keys[:, part].float().sum(1))
        mean.div_(max(rows, 1))
        for part in slices:
            self.score_keys[slot, :, part] = (keys[:, part].float() - mean[:, None]).to(SCORE_KEY_DTYPE)

    def scoring_keys(self, slot: int | None = None) -> Tensor:
        """Return the keys to score with, ``[B, Hkv, S, D]`` (one slot: ``[1, ...]``): the 8-bit copy if kept, else
        K."""
        keys = self.k if self.score_keys is None else self.score_keys
        return keys if slot is None else keys[slot : slot + 1]


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Return x with rotary position embedding applied (half-split layout, as in HF checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@fused_on_gpu
def rope_and_store(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
    k_cache: Tensor, v_cache: Tensor, slots: Tensor, positions: Tensor,
    score_keys: Tensor | None = None, key_mean: Tensor | None = None,
) -> Tensor:
    """Rotate ``q`` and ``k`` (``[B, T, H, D]``, ``cos``/``sin`` ``[B, T, 1, D]``), store ``k`` and ``v`` in place at row
    ``positions[b, t]`` of cache slot ``slots[b]`` (caches ``[slots, Hkv, S, D]``), and return ``q`` as a
    ``[B, Hq, T, D]`` view. With ``score_keys`` (and ``key_mean`` ``[slots, Hkv, D]``), also store the rotated
    ``k`` minus its slot's mean there, in 8 bits (:meth:`KVCache.keep_score_keys`).

    On the GPU this is one fused kernel per layer and step where rotation, row arithmetic and the two
    scatters took seven; the view keeps ``[B, T, Hq, D]`` memory, so an attention output allocated like
    ``q`` reaches ``o_proj`` without a copy.
    """
    rows = (slots.view(-1, 1), slice(None), positions)
    k_rot = rotate(k, cos, sin)
    k_cache[rows] = k_rot.to(k_cache.dtype)
    v_cache[rows] = v.to(v_cache.dtype)
    if score_keys is not None and key_mean is not None:
        score_keys[rows] = (k_rot.float() - key_mean[slots].unsqueeze(1)).to(score_keys.dtype)
    return rotate(q, cos, sin).transpose(1, 2)


class Rope(NamedTuple):
    """A forward's rotary tables ``cos``/``sin`` ``[B, T, 1, D]`` and where its tokens go: row ``positions[b, t]``
    of cache slot ``slots[b]``; made once per forward, shared by every layer."""

    cos: Tensor
    sin: Tensor
    positions: Tensor
    slots: Tensor


@fused_on_gpu
def rope_tables(
    tokens: Tensor, start_pos: Tensor, inv_freq: Tensor, scaling: float, dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(cos, sin, positions)`` for ``tokens`` ``[B, T]`` placed at ``start_pos[b] + t``: the tables
    ``[B, T, 1, D]`` in ``dtype`` (times the rope ``scaling``) and the positions ``[B, T]``."""
    b, t = tokens.shape
    positions = start_pos.view(b, 1) + torch.arange(t, device=tokens.device).view(1, t)
    freqs = positions.unsqueeze(-1).float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype).unsqueeze(2), (emb.sin() * scaling).to(dtype).unsqueeze(2), positions


class Attention(nn.Module):
    """Grouped-query self-attention that writes to its KV cache and delegates the attending."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        hd = config.head_dim
        # q, k and v in one matrix: one GEMV per step instead of three (see fuse_projections).
        self.qkv_proj = Linear(config.hidden_size, (config.n_heads + 2 * config.n_kv_heads) * hd, bias=config.qkv_bias)
        self.o_proj = Linear(config.n_heads * hd, config.hidden_size, bias=config.o_bias)
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Rope, start_pos: Tensor, attention: AttentionFn, slot: int | None = None) -> Tensor:
        """Return the attention block's output for ``x`` of shape ``[B, T, hidden]`` (``B = 1`` with ``slot``)."""
        b, t, _ = x.shape
        hd, hq, hkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv_proj(x).split([hq * hd, hkv * hd, hkv * hd], dim=-1)
        assert self.cache is not None, "call setup_cache() before forward()"
        q = rope_and_store(q.view(b, t, hq, hd), k.view(b, t, hkv, hd), v.view(b, t, hkv, hd), rope.cos, rope.sin,
                           self.cache.k, self.cache.v, rope.slots, rope.positions, self.cache.score_keys,
                           self.cache.key_mean)
        k_cache, v_cache = self.cache.rows(slot)
        out = attention(self.layer, q, k_cache, v_cache, start_pos)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = Linear(h, 2 * i, bias=bias)  # gate and up in one GEMV
        self.down_proj = Linear(i, h, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return down(silu(gate(x)) * up(x))."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(swiglu(gate, up))


class Block(nn.Module):
    """One pre-norm transformer layer."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, residual: Tensor, x: Tensor, next_norm: RMSNorm, rope: Rope, start_pos: Tensor, attention: AttentionFn,
        slot: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return the residual stream after this layer and ``next_norm`` of it, given the stream before it and
        ``x``, this layer's input norm of that stream (each norm is fused with the residual add before it)."""
        norm = self.post_attention_layernorm
        residual, x = add_rms_norm(self.self_attn(x, rope, start_pos, attention, slot), residual, norm.weight, norm.eps)
        return add_rms_norm(self.mlp(x), residual, next_norm.weight, next_norm.eps)


class Transformer(nn.Module):
    """A decoder-only LM; parameter names follow HF checkpoints except the fused ``qkv_proj`` and
    ``gate_up_proj`` (:func:`fuse_projections` converts an HF state dict)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq, self.rope_scaling = config.rope_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.batch_size = 0
        self.max_len = 0

    def setup_cache(self, batch_size: int, max_len: int, slack: int = 0) -> None:
        """Preallocate every layer's KV cache for ``batch_size`` sequences of up to ``max_len`` tokens.

        ``slack`` extra scratch rows let a right-padded batch write its padding past the longest
        sequence without clobbering real rows.
        """
        cfg = self.config
        if max_len > cfg.max_position_embeddings:
            raise STSError(
                f"{max_len} tokens exceed the context of {cfg.name} ({cfg.max_position_embeddings})"
            )
        if cfg.sliding_window is not None and max_len > cfg.sliding_window:
            raise STSError(
                f"{max_len} tokens exceed {cfg.name}'s sliding window ({cfg.sliding_window}), "
                "which sts does not implement"
            )
        rows = max_len + slack
        if batch_size == self.batch_size and rows <= self.max_len:
            return
        param = self.embed_tokens.weight
        for block in self.layers:
            block.self_attn.cache = KVCache(batch_size, cfg.n_kv_heads, rows, cfg.head_dim, param.dtype, param.device)
        self.batch_size, self.max_len = batch_size, rows

    def hidden(
        self, tokens: Tensor, start_pos: Tensor, attention: AttentionFn = dense_attention, slot: int | None = None,
    ) -> Tensor:
        """Return final-norm hidden states ``[B, T, hidden]`` for ``tokens`` placed at ``start_pos[b] + t``.

        With ``slot``, ``tokens`` is one sequence (``B = 1``) that reads and writes batch slot ``slot`` of the cache.
        """
        b = tokens.shape[0]
        residual = self.embed_tokens(tokens)
        slots = torch.arange(b, device=tokens.device) if slot is None else torch.full((1,), slot, device=tokens.device)
        rope = Rope(*rope_tables(tokens, start_pos, self.inv_freq, self.rope_scaling, residual.dtype), slots)
        x = self.layers[0].input_layernorm(residual)
        next_norms = [block.input_layernorm for block in self.layers[1:]] + [self.norm]
        for block, next_norm in zip(self.layers, next_norms):
            residual, x = block(residual, x, next_norm, rope, start_pos, attention, slot)
        return x

    def forward(self, tokens: Tensor, start_pos: Tensor, attention: AttentionFn = dense_attention) -> Tensor:
        """Return logits ``[B, T, vocab]`` (float32) for ``tokens`` placed at ``start_pos[b] + t``."""
        return self.lm_head(self.hidden(tokens, start_pos, attention)).float()


def fuse_projections(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Return an HF-named state dict with each layer's q/k/v and gate/up weights concatenated."""
    out = dict(state)
    groups = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
    for name in list(state):
        for fused, parts in groups.items():
            for kind in ("weight", "bias"):
                if name.endswith(f"{parts[0]}.{kind}"):
                    prefix = name[: -len(f"{parts[0]}.{kind}")]
                    keys = [f"{prefix}{p}.{kind}" for p in parts]
                    out[f"{prefix}{fused}.{kind}"] = torch.cat([out.pop(k) for k in keys], dim=0)
    return out
