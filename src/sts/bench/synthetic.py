"""Synthetic target/draft pairs in real shapes whose draft agrees with the target at a chosen rate.

Speed depends on shapes, not weight values, but random weights accept nothing in speculative
decoding. These models have the real shapes (bytes and FLOPs per step are those of the real
models) and a next-token rule known in advance, independent of the context:

* The layers add almost nothing to the residual stream: ``o_proj`` and ``down_proj`` are drawn
  ``residual_scale`` (default 1e-3) times smaller than the usual 0.02, so after the last layer
  the stream is the current token's embedding up to about 1e-3 relative, whatever the context
  and the KV cache hold. The layers still read every byte and do every FLOP.
* Embedding rows are Gaussian with unit entries, so any two are nearly orthogonal: the largest
  |cosine| of a row with the 128255 others is about 0.09 in 4096 and 0.13 in 2048 dimensions
  (measured, H200, bf16), and below 0.7 for the 64-dimensional test shapes: far from 1.
* The LM head maps token ``t`` to ``f(t)``: row ``f(t)`` is ``sharpness / sqrt(hidden)`` times the
  unit vector of ``embed[t]``. The final RMS norm turns the stream into ``sqrt(hidden)`` times that
  unit vector, so the logit of ``f(t)`` is ``sharpness`` and every other logit is ``sharpness``
  times a cosine between two random rows: about ``N(0, sharpness**2 / hidden)``.
* The target follows ``f(t) = (a * t + c) mod V``, one cycle through the whole vocabulary
  (Hull-Dobell: ``c`` coprime to ``V``, ``a - 1`` divisible by every prime of ``V`` and by 4 when
  4 divides ``V``), so a greedy run of ``n < V`` tokens never repeats a token. The draft follows a
  permutation ``g`` that equals ``f`` except on a uniformly random set ``D`` of
  ``round((1 - agreement) * V)`` tokens, where ``g(d_i) = f(d_{i+1})`` for ``D`` in random order
  (so ``g(t) != f(t)`` exactly on ``D``).

What these pairs cannot measure: anything that depends on what attention picks. The prediction
ignores the context, so sparse verification (STS, any budget) accepts exactly as dense does, and
attention scores, recall and selection quality are those of random queries and keys. They fix the
acceptance so that a run measures speed through the real decode loop; accuracy needs real weights.

Both models have untied LM heads, even where the real model (Llama-3.2-1B) ties them to the
embedding table: the head must map ``t`` to ``f(t)``, not to ``t``. The bytes a step reads are
the same: the LM head matrix (``V x hidden``) is read once per step either way, and of the
embedding table only the rows of the step's tokens (``sts.costmodel.weight_bytes`` counts the
untied table out). Only memory grows, by the table (0.5 GB in bf16 for the 1B shape).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from sts.errors import STSError
from sts.models.config import ModelConfig
from sts.models.transformer import Transformer
from sts.parallel import Shard

#: Llama-3.1 RoPE scaling, as in the real checkpoints (the values ``e2e.random_model`` uses).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

#: Shapes small enough for CPU tests (same vocabulary, so they pair with each other).
TINY_SHAPES = {
    "tiny-target": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "tiny-draft": dict(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048),
}

#: Standard deviation of the ordinary weights (that of ``e2e.random_model``).
INIT_STD = 0.02

#: Float32 elements per chunk when building the LM head (64 MB): no full-size float32 copy.
_CHUNK_ELEMENTS = 1 << 24


def shape_config(shape: str | dict[str, Any] | ModelConfig, max_position_embeddings: int | None = None) -> ModelConfig:
    """Return the config of a named shape (``e2e.SHAPES`` or ``TINY_SHAPES``), a dict of LlamaConfig
    fields, or a ``ModelConfig``, with untied word embeddings (see the module docstring)."""
    if isinstance(shape, ModelConfig):
        config = dataclasses.replace(shape, tie_word_embeddings=False)
        if max_position_embeddings is not None:
            config = dataclasses.replace(config, max_position_embeddings=max_position_embeddings)
        return config
    from transformers import LlamaConfig

    if isinstance(shape, str):
        fields, name = dict(TINY_SHAPES.get(shape) or _real_shape(shape)), f"{shape}-synthetic"
    else:
        fields, name = dict(shape), "synthetic"
    fields["tie_word_embeddings"] = False
    if max_position_embeddings is not None:
        fields["max_position_embeddings"] = max_position_embeddings
    if "rope_parameters" not in fields:
        # Short test shapes keep Llama-3's scaling with a pre-training length below their context.
        original = min(LLAMA3_ROPE["original_max_position_embeddings"], fields["max_position_embeddings"] // 8)
        fields["rope_parameters"] = {**LLAMA3_ROPE, "original_max_position_embeddings": original}
    return ModelConfig.from_hf(LlamaConfig(**fields), name=name)


def _real_shape(name: str) -> dict[str, Any]:
    """Return the LlamaConfig fields of a shape of ``sts.bench.e2e.SHAPES``."""
    from sts.bench.e2e import SHAPES  # here, not at the top: e2e imports the whole engine

    if name not in SHAPES:
        raise STSError(f"unknown shape {name!r} (known: {', '.join([*SHAPES, *TINY_SHAPES])})")
    return SHAPES[name]


def _prime_factors(n: int) -> list[int]:
    """Return the distinct prime factors of ``n`` (trial division: ``n`` is a vocabulary size)."""
    out, p = [], 2
    while p * p <= n:
        if n % p == 0:
            out.append(p)
            while n % p == 0:
                n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def next_token_maps(vocab_size: int, agreement: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Return ``(f, g)``, each ``[V]`` int64 on the CPU: the target's and the draft's next token after each token.

    ``f`` is one cycle through the vocabulary; ``g`` equals ``f`` on all but ``round((1 - agreement) * V)``
    tokens, chosen uniformly at random. Random placement, not an even spacing, is what makes greedy
    acceptance a sequence of independent trials: a round examines consecutive tokens of ``f``'s cycle,
    rounds examine disjoint stretches of it, and along the cycle the disagreeing tokens fall like
    Bernoulli(1 - agreement) draws (up to the without-replacement correction, which only lowers the
    variance). Evenly spaced disagreement would make the count per round deterministic, e.g. always
    ``gamma + 1`` at agreement 0.8 and gamma 4, far from the geometric mean of 3.36.
    Built on the CPU from ``seed`` alone, so a seed gives the same maps on every device.
    """
    if not 0.0 <= agreement <= 1.0:
        raise STSError(f"agreement must be in [0, 1], got {agreement}")
    gen = torch.Generator().manual_seed(seed)
    step = math.prod(_prime_factors(vocab_size)) * (2 if vocab_size % 4 == 0 else 1)
    mult = 1 + step * int(torch.randint(0, max(vocab_size // step, 1), (1,), generator=gen))
    shift = int(torch.randint(1, vocab_size, (1,), generator=gen)) if vocab_size > 1 else 0
    while math.gcd(shift, vocab_size) != 1:
        shift = (shift + 1) % vocab_size
    f = (mult * torch.arange(vocab_size) + shift) % vocab_size
    n_disagree = round((1.0 - agreement) * vocab_size)
    if n_disagree == 1:
        raise STSError(f"agreement {agreement} leaves one disagreeing token of {vocab_size}: "
                       "no permutation differs from the target's at exactly one token")
    disagree = torch.randperm(vocab_size, generator=gen)[:n_disagree]
    g = f.clone()
    g[disagree] = f[disagree.roll(-1)]
    return f, g


def expected_tokens_per_round(agreement: float, gamma: int) -> float:
    """Return the expected tokens per target forward, ``sum_{i=0..gamma} a**i``, for per-token acceptance ``a``.

    A round accepts draft token ``i`` only if tokens ``1..i`` were all accepted, and always adds one
    target token (the correction or the bonus), so with independent acceptances of probability ``a``
    the count is ``1 + a + ... + a**gamma = (1 - a**(gamma + 1)) / (1 - a)``. For greedy decoding of a
    synthetic pair ``a`` is the agreement (see :func:`next_token_maps` for why the trials are
    independent); for sampling it is :func:`acceptance_rate`.
    """
    if not 0.0 <= agreement <= 1.0:
        raise STSError(f"agreement must be in [0, 1], got {agreement}")
    return float(gamma + 1) if agreement == 1.0 else (1.0 - agreement ** (gamma + 1)) / (1.0 - agreement)


def _log_partition(sharpness: float, temperature: float, vocab_size: int, hidden_size: int) -> tuple[float, float]:
    """Return (log of the softmax normaliser, std of the other logits), both in temperature units.

    The top logit is ``z = sharpness / T``; the ``V - 1`` others are about ``N(0, s**2)`` with
    ``s = z / sqrt(hidden)``, whose exponentials average ``exp(s**2 / 2)`` (lognormal).
    """
    z = sharpness / temperature
    spread = z / math.sqrt(hidden_size)
    rest = math.log(vocab_size - 1) + spread**2 / 2
    return max(z, rest) + math.log1p(math.exp(-abs(z - rest))), spread


def top_probability(sharpness: float, temperature: float, vocab_size: int, hidden_size: int) -> float:
    """Return the probability a synthetic model gives its top token ``f(t)`` when sampling at ``temperature``.

    ``1 / (1 + (V - 1) * exp(s**2 / 2 - z))`` with ``z = sharpness / T``, ``s = z / sqrt(hidden)``.
    """
    log_z, _ = _log_partition(sharpness, temperature, vocab_size, hidden_size)
    return math.exp(sharpness / temperature - log_z)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def acceptance_rate(agreement: float, sharpness: float, temperature: float, vocab_size: int,
                    target_hidden: int, draft_hidden: int) -> float:
    """Return the per-token probability that speculative sampling accepts a synthetic draft's token.

    Acceptance at one position is ``sum_x min(p(x), q(x))``. Where the draft agrees (``g(t) = f(t)``)
    the two top tokens coincide: ``min(pi_p, pi_q)`` plus the overlap of the two flat remainders;
    where it disagrees only the remainders overlap. The remainders are ``V - 1`` lognormal masses
    with independent noise in the two models (their embeddings are independent), and for
    ``X = A e^N``, ``Y = B e^M`` with ``N ~ N(0, s_p^2)``, ``M ~ N(0, s_q^2)``:
    ``E min(X, Y) = A e^{s_p^2/2} Phi((ln(B/A) - s_p^2) / S) + B e^{s_q^2/2} Phi((ln(A/B) - s_q^2) / S)``,
    ``S^2 = s_p^2 + s_q^2``. At ``temperature == 0`` this is the agreement itself.

    Assumes plain temperature sampling (no top-k / top-p) and Gaussian cosines between random
    embedding rows; against the models' own ``sum_x min(p, q)`` over the whole vocabulary it is within
    1e-3 already at hidden size 64. Visited tokens' agreement stays independent across positions, as
    for greedy decoding: a sampled token is either ``f`` of the previous one (the next on the cycle)
    or a random one, so :func:`expected_tokens_per_round` of this rate is the expected round.
    """
    if temperature == 0.0:
        return agreement
    log_zp, sp = _log_partition(sharpness, temperature, vocab_size, target_hidden)
    log_zq, sq = _log_partition(sharpness, temperature, vocab_size, draft_hidden)
    z = sharpness / temperature
    pi_p, pi_q = math.exp(z - log_zp), math.exp(z - log_zq)
    spread = math.hypot(sp, sq)
    # ln(B/A) with A = 1/Z_p, B = 1/Z_q: the per-token scales of the two remainders.
    log_ratio = log_zp - log_zq
    overlap = ((1 - pi_p) * _normal_cdf((log_ratio - sp**2) / spread)
               + (1 - pi_q) * _normal_cdf((-log_ratio - sq**2) / spread))
    agree = min(pi_p, pi_q) + overlap
    # f(t) and g(t) are each the other model's remainder tokens, worth about (1 - pi) / (V - 1).
    disagree = (overlap * (vocab_size - 2) / (vocab_size - 1)
                + min(pi_p, (1 - pi_q) / (vocab_size - 1)) + min(pi_q, (1 - pi_p) / (vocab_size - 1)))
    return agreement * agree + (1 - agreement) * disagree


def sharpness_for(top: float, temperature: float, vocab_size: int, hidden_size: int) -> float:
    """Return the sharpness at which a synthetic model's top token has probability ``top`` at ``temperature``.

    Solves ``z = ln(top / (1 - top)) + ln(V - 1) + z**2 / (2 * hidden)`` for ``z = sharpness / T``
    (the smaller root); raises :class:`STSError` where no sharpness gets that peaked (the other
    logits' spread grows with the sharpness).
    """
    if not 0.0 < top < 1.0:
        raise STSError(f"top probability must be in (0, 1), got {top}")
    c = math.log(top / (1 - top)) + math.log(vocab_size - 1)
    disc = 1 - 2 * c / hidden_size
    if disc < 0:
        raise STSError(f"no sharpness gives top probability {top} with vocabulary {vocab_size} in {hidden_size} dimensions")
    return temperature * hidden_size * (1 - math.sqrt(disc))


def _fill_layers(model: Transformer, residual_scale: float, gen: torch.Generator, whole: ModelConfig,
                 partition: Shard | None) -> None:
    """Draw every layer weight in place: usual scale, except the residual writers ``o_proj``/``down_proj``.

    With ``partition`` the model is that rank's part of a ``whole`` model: each split weight is drawn
    whole (one weight at a time), so the part holds exactly the whole model's values.
    """
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Transformer(whole).layers.named_parameters()}
    for name, p in model.layers.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            std = INIT_STD * (residual_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
            key = f"layers.{name}"
            if partition is None or partition.split(whole, key) is None:
                p.normal_(0.0, std, generator=gen)
            else:
                drawn = torch.empty(shapes[name], dtype=p.dtype, device=p.device).normal_(0.0, std, generator=gen)
                p.copy_(partition.take(whole, key, drawn))
    model.norm.weight.fill_(1.0)


def _fill_head(model: Transformer, successor: Tensor, sharpness: float) -> None:
    """Set LM head row ``successor[t]`` to ``sharpness / sqrt(hidden)`` times the unit vector of ``embed[t]``.

    Works in row chunks of about 64 MB of float32, so the 8B shape's 128256 x 4096 table never has a
    full float32 copy on the GPU.
    """
    embed, head = model.embed_tokens.weight, model.lm_head.weight
    source = torch.argsort(successor).to(embed.device)  # head row y holds token source[y]
    scale = sharpness / math.sqrt(embed.shape[1])
    rows = max(1, _CHUNK_ELEMENTS // embed.shape[1])
    for lo in range(0, embed.shape[0], rows):
        chunk = embed[source[lo : lo + rows]].float()
        head[lo : lo + rows].copy_(chunk * (scale / chunk.norm(dim=-1, keepdim=True)))


def synthetic_model(config: ModelConfig, successor: Tensor, *, sharpness: float = 20.0, residual_scale: float = 1e-3,
                    seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                    partition: Shard | None = None) -> Transformer:
    """Return a model of ``config`` whose greedy next token after ``t`` is ``successor[t]`` in any context.

    ``successor`` is a permutation ``[V]`` of the vocabulary; ``sharpness`` is the top logit's lead over
    the mean of the others (the others spread with std ``sharpness / sqrt(hidden)``); the weights are
    drawn in place in ``dtype`` on ``device`` from ``seed``. ``partition``: return only that
    tensor-parallel rank's part (:class:`sts.parallel.Shard`), equal to the whole model cut by
    :func:`sts.parallel.shard_model` but never holding it whole (a 70B shape does not fit one GPU
    beside its cache). Raises STSError as :meth:`~sts.parallel.Shard.local_config` does.
    """
    if config.tie_word_embeddings:
        raise STSError("a synthetic model needs an untied LM head (see shape_config)")
    local = partition.local_config(config) if partition is not None else config
    with torch.device("meta"):
        model = Transformer(local).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0.0, 1.0, generator=gen)
        _fill_layers(model, residual_scale, gen, config, partition)
        _fill_head(model, successor, sharpness)
    model.inv_freq = config.rope_inv_freq()[0].to(device)
    if partition is not None:
        partition.attach(model)
    return model.eval().requires_grad_(False)


def synthetic_pair(target_shape: str | dict[str, Any] | ModelConfig, draft_shape: str | dict[str, Any] | ModelConfig,
                   agreement: float, *, seed: int = 0, sharpness: float = 20.0, residual_scale: float = 1e-3,
                   dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                   max_position_embeddings: int | None = None, partition: Shard | None = None) -> tuple[Transformer, Transformer]:
    """Return ``(target, draft)`` in the given shapes whose greedy next tokens agree on a share ``agreement`` of the vocabulary.

    The target follows ``f`` and the draft ``g`` of :func:`next_token_maps` ``(V, agreement, seed)``.
    Greedy speculative decoding then accepts ``expected_tokens_per_round(agreement, gamma)`` tokens
    per round on average. ``sharpness`` (logits, default 20) only matters when sampling: at temperature
    ``T`` the top token has probability :func:`top_probability` and a draft token is accepted with
    probability :func:`acceptance_rate`; 20 makes sampling at ``T = 1`` nearly greedy for the
    128256-token vocabulary, :func:`sharpness_for` picks one for a wanted top probability.
    ``max_position_embeddings`` overrides the shapes' context length. ``partition``: the target is only
    that tensor-parallel rank's part (see :func:`synthetic_model`); the draft is whole.
    """
    target_config = shape_config(target_shape, max_position_embeddings)
    draft = synthetic_draft(target_config, draft_shape, agreement, seed=seed, sharpness=sharpness,
                            residual_scale=residual_scale, dtype=dtype, device=device,
                            max_position_embeddings=max_position_embeddings)
    f, _ = next_token_maps(target_config.vocab_size, agreement, seed)
    target = synthetic_model(target_config, f, seed=seed, sharpness=sharpness, residual_scale=residual_scale, dtype=dtype,
                             device=device, partition=partition)
    return target, draft


def synthetic_draft(target: ModelConfig, draft_shape: str | dict[str, Any] | ModelConfig, agreement: float, *,
                    seed: int = 0, sharpness: float = 20.0, residual_scale: float = 1e-3, dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device = "cuda", max_position_embeddings: int | None = None) -> Transformer:
    """Return the draft of :func:`synthetic_pair` for a target of config ``target`` (same ``seed``): a second draft
    at another ``agreement`` predicts the same target worse or better (the target's map ``f`` depends on ``seed``
    alone). Raises STSError when the vocabularies differ."""
    config = shape_config(draft_shape, max_position_embeddings)
    if target.vocab_size != config.vocab_size:
        raise STSError(f"draft vocabulary ({config.vocab_size}) differs from the target's ({target.vocab_size})")
    _, g = next_token_maps(config.vocab_size, agreement, seed)
    return synthetic_model(config, g, seed=seed + 1, sharpness=sharpness, residual_scale=residual_scale, dtype=dtype,
                           device=device)


def fill_cache(model: Transformer, batch: int, context: int, *, lookahead: int = 64, seed: int = 0) -> Tensor:
    """Return start positions ``[B]`` (all ``context``), the cache's ``context + lookahead`` rows filled at random.

    A synthetic model's prediction does not depend on its cache, so long contexts are benchmarked by
    starting decode at ``context`` instead of prefilling it; ``lookahead`` rows are left for the
    tokens a decode run writes past it. Keys and values are standard normal, like the real models'
    projections of a unit-RMS stream.
    """
    model.setup_cache(batch, context + lookahead)
    device = model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.cache.k.normal_(generator=gen)
            block.self_attn.cache.v.normal_(generator=gen)
    return torch.full((batch,), context, dtype=torch.long, device=device)
