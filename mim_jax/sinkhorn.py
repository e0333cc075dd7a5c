"""CAPI's targets: positionwise Sinkhorn-Knopp over the global batch and the clustering loss
(facebookresearch/capi `model.py` `sinkhorn_knopp`, `OnlineClustering`; capi.md §3.1, §3.3).

Everything is plain jnp over the global batch axis: under jit with the batch sharded over the
mesh, XLA turns the batch max and the column sums into all-reduces (`pmax`, `psum`), exactly the
official `all_reduce` calls, and keeps the row normalisation local.

Memory: the clustering logits are B x P x K (ViT-L: 512 images x 256 positions x 16384 prototypes
per device = 2.1G values). SK is independent per position, so `clustering_targets` runs over
chunks of positions with `lax.map` and rematerialises each chunk in the backward pass: only one
chunk of logits is ever alive.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

EXP_SHIFT = 50.0   # the official exp shift for bf16/fp32 (0 for fp16): the column max becomes e^50


def sinkhorn_knopp(scores, iterations: int = 3, eps: float = 1e-8):
    """scores [..., B, K] (already divided by the temperature) -> assignments [..., B, K].

    exp(S - max over the batch + 50), then `iterations` times: divide each prototype column by
    its sum over the (global) batch, then each row by its sum over prototypes. Rows end summing
    to 1; columns to about B/K."""
    scores = scores.astype(jnp.float32)
    q = jnp.exp(scores - jnp.max(scores, axis=-2, keepdims=True) + EXP_SHIFT)
    for _ in range(iterations):
        q = q / (jnp.sum(q, axis=-2, keepdims=True) + eps)
        q = q / (jnp.sum(q, axis=-1, keepdims=True) + eps)
    return q


def soft_cross_entropy(targets, logits, temperature: float):
    """-sum_k t_k log softmax(logits / T)_k per row, in float32."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1), axis=-1)


def clustering_targets(head_fn, head_params, tokens, predict_idx, *, target_temp: float = 0.06,
                       pred_temp: float = 0.12, iterations: int = 3, chunk: int | None = None):
    """Online clustering of teacher tokens and the student's targets.

    head_fn(head_params, z [B, c, D]) -> logits [B, c, K]; tokens: teacher patch tokens [B, P, D]
    (stop-gradient); predict_idx [B, n]: positions whose targets the student predicts.
    Returns (clustering loss: mean over all B*P tokens, differentiable in head_params only;
    targets [B, n, K] (no gradient); stats: mean target entropy and a [K] histogram of argmax
    assignments, for collapse monitoring).
    """
    b, p, _ = tokens.shape
    chunk = p if chunk is None else chunk
    if p % chunk:
        raise ValueError(f"The position chunk ({chunk}) must divide the number of positions ({p}).")
    tokens = jax.lax.stop_gradient(tokens)
    # [P/c, c, B, D]: positions chunked on the leading axis; the batch axis stays sharded.
    chunks = tokens.transpose(1, 0, 2).reshape(p // chunk, chunk, b, tokens.shape[-1])
    starts = jnp.arange(0, p, chunk)

    @jax.checkpoint   # recompute each chunk's logits in the backward pass instead of storing them
    def one_chunk(args):
        z, start = args
        logits = head_fn(head_params, z.transpose(1, 0, 2)).transpose(1, 0, 2)          # [c, B, K]
        q = jax.lax.stop_gradient(sinkhorn_knopp(jax.lax.stop_gradient(logits) / target_temp, iterations))
        loss = jnp.sum(soft_cross_entropy(q, logits, pred_temp))
        # Targets of the predicted positions that fall in this chunk.
        in_chunk = jax.nn.one_hot(predict_idx - start, chunk, dtype=q.dtype)              # [B, n, c]
        picked = jnp.einsum("bnc,cbk->bnk", in_chunk, q)
        entropy = -jnp.sum(q * jnp.log(q + 1e-12))
        usage = jnp.zeros(q.shape[-1], jnp.float32).at[jnp.argmax(q, -1).reshape(-1)].add(1.0)
        return loss, picked, entropy, usage

    losses, picked, entropies, usage = jax.lax.map(one_chunk, (chunks, starts))
    n = b * p
    stats = {"target_entropy": jnp.sum(entropies) / n, "assignment_histogram": jnp.sum(usage, 0)}
    return jnp.sum(losses) / n, jax.lax.stop_gradient(jnp.sum(picked, 0)), stats
