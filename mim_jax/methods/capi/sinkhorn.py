"""CAPI's targets: positionwise Sinkhorn-Knopp over the global batch and the clustering loss
(facebookresearch/capi `model.py` `sinkhorn_knopp`, `OnlineClustering`; docs/methods/capi.md §3.1, §3.3).

Everything is plain jnp over the global batch axis: under jit with the batch sharded over the
mesh, XLA turns the batch max and the column sums into all-reduces (`pmax`, `psum`), exactly the
official `all_reduce` calls, and keeps the row normalisation local.

Memory: the clustering logits are B x P x K (ViT-L: 512 images x 256 positions x 16384 prototypes
per device = 2.1G values). SK is independent per position, so `clustering_targets` runs over
chunks of positions with `lax.scan` and computes each chunk's gradient as it goes: only one chunk
of logits is ever alive, and nothing is recomputed in the backward pass.
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

    The loss's gradient is computed in the forward pass, chunk by chunk: d/ds of
    -sum_k q_k log softmax(s / T)_k is (softmax(s / T) sum_k q_k - q) / T, and the head's vjp turns
    it into a parameter gradient at once. Autodiff would have to keep every chunk's logits or
    recompute them (and Sinkhorn) in the backward pass: this saves one B x P x D x K matmul and the
    Sinkhorn iterations per step, and only one chunk of logits is ever alive.
    """
    b, p, _ = tokens.shape
    chunk = p if chunk is None else chunk
    if p % chunk:
        raise ValueError(f"The position chunk ({chunk}) must divide the number of positions ({p}).")
    n = b * p
    # [P/c, c, B, D]: positions chunked on the leading axis; the batch axis stays sharded.
    chunks = jax.lax.stop_gradient(tokens).transpose(1, 0, 2).reshape(p // chunk, chunk, b, tokens.shape[-1])
    starts = jnp.arange(0, p, chunk)

    def one_chunk(params, z, start, with_grad: bool):
        head = lambda prm: head_fn(prm, z.transpose(1, 0, 2)).transpose(1, 0, 2)       # noqa: E731  [c, B, K]
        logits, head_vjp = jax.vjp(head, params)
        q = sinkhorn_knopp(logits / target_temp, iterations)
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32) / pred_temp, axis=-1)
        loss = -jnp.sum(q * log_p)
        # Targets of the predicted positions that fall in this chunk.
        in_chunk = jax.nn.one_hot(predict_idx - start, chunk, dtype=q.dtype)              # [B, n, c]
        picked = jnp.einsum("bnc,cbk->bnk", in_chunk, q)
        entropy = -jnp.sum(q * jnp.log(q + 1e-12))
        usage = jnp.zeros(q.shape[-1], jnp.float32).at[jnp.argmax(q, -1).reshape(-1)].add(1.0)
        outputs = (loss, picked, entropy, usage)
        if not with_grad:
            return outputs, None
        d_logits = (jnp.exp(log_p) * jnp.sum(q, -1, keepdims=True) - q) / (pred_temp * n)
        return outputs, head_vjp(d_logits.astype(logits.dtype))[0]

    def reduce(losses, picked, entropies, usage):
        stats = {"target_entropy": jnp.sum(entropies) / n, "assignment_histogram": jnp.sum(usage, 0)}
        return jnp.sum(losses) / n, jnp.sum(picked, 0), stats

    def forward(params, with_grad: bool):
        def body(grad, args):
            outputs, chunk_grad = one_chunk(params, *args, with_grad)
            return (jax.tree.map(jnp.add, grad, chunk_grad) if with_grad else grad), outputs
        zero = jax.tree.map(jnp.zeros_like, params) if with_grad else None
        grad, outputs = jax.lax.scan(body, zero, (chunks, starts))
        return reduce(*outputs), grad

    @jax.custom_vjp
    def run(params):
        return forward(params, with_grad=False)[0]

    def run_fwd(params):
        return forward(params, with_grad=True)

    def run_bwd(grad, cotangents):
        # Only the loss carries a gradient; the targets and statistics are stop-gradient.
        return (jax.tree.map(lambda g: g * cotangents[0].astype(g.dtype), grad),)

    run.defvjp(run_fwd, run_bwd)
    loss, picked, stats = run(head_params)
    return loss, jax.lax.stop_gradient(picked), stats
