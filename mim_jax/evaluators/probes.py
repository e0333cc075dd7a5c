"""Linear and attentive probes on frozen-encoder features, a sweep of learning rates trained at once.

Features are computed once on the centre view and cached (no augmentation), so every epoch costs
only the heads. All heads of the sweep live in one stacked pytree: one jitted step updates all of
them, each with its own learning rate, and each is evaluated; the best is reported (as MAE, DINO and
CAPI report the best of their sweeps).
- Linear (MAE): BatchNorm without affine, then a linear layer. With cached features the
  normalisation uses the training set's mean and variance (BN's running statistics at convergence).
  SGD with momentum 0.9, no weight decay, cosine decay.
- Attentive (CAPI, data2vec 2.0): one cross-attention block whose single learned query attends to
  the frozen patch tokens, then LayerNorm and a linear classifier; AdamW, cosine decay.
"""
from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mim_jax.evaluators.common import topk_accuracy
from mim_jax.runtime import console


class LinearHead(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros)(x)


class AttentiveHead(nn.Module):
    """Cross-attention pooling with one learned query, then a linear classifier."""
    num_classes: int
    num_heads: int = 4

    @nn.compact
    def __call__(self, tokens):
        d = tokens.shape[-1]
        query = self.param("query", nn.initializers.normal(0.02), (1, 1, d))
        tokens = nn.LayerNorm()(tokens)
        pooled = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(
            jnp.broadcast_to(query, (tokens.shape[0], 1, d)), tokens)[:, 0]
        pooled = pooled + nn.Dense(d)(nn.gelu(nn.Dense(2 * d)(nn.LayerNorm()(pooled))))
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros)(nn.LayerNorm()(pooled))


def standardize(train: np.ndarray, *others: np.ndarray):
    """BatchNorm without affine, with the training set's statistics per feature."""
    axes = tuple(range(train.ndim - 1))
    mean = train.mean(axes, dtype=np.float64)
    std = np.sqrt(train.var(axes, dtype=np.float64) + 1e-6)
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)]


def train_probes(head: nn.Module, train, eval_, *, learning_rates, epochs: int, batch_size: int,
                 optimizer: str = "sgd", weight_decay: float = 0.0, seed: int = 0, what: str = "probe") -> dict:
    """Trains one head per learning rate; returns {lr: {'top1':..,'top5':..}} on `eval_`. Says
    what it trains, and a long run its progress in epochs."""
    (x, y), (x_eval, y_eval) = train, eval_
    lrs = jnp.asarray(learning_rates, jnp.float32)
    steps_per_epoch = max(len(x) // batch_size, 1)
    total = epochs * steps_per_epoch
    # Unit learning rate; each head's updates are scaled by its own lr afterwards.
    shape = optax.cosine_decay_schedule(1.0, total)
    if optimizer == "sgd":
        tx = optax.chain(optax.trace(decay=0.9), optax.scale_by_schedule(lambda s: -shape(s)))
    else:
        tx = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay),
                         optax.scale_by_schedule(lambda s: -shape(s)))

    keys = jax.random.split(jax.random.key(seed), len(learning_rates))
    params = jax.vmap(lambda k: head.init(k, jnp.asarray(x[:2])))(keys)
    opt_state = jax.vmap(tx.init)(params)

    def loss_fn(p, xb, yb):
        logits = head.apply(p, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(params, opt_state, xb, yb):
        grads = jax.vmap(jax.grad(loss_fn), in_axes=(0, None, None))(params, xb, yb)
        updates, opt_state = jax.vmap(tx.update)(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * lrs.reshape((-1,) + (1,) * (u.ndim - 1)), updates)
        return optax.apply_updates(params, updates), opt_state

    predict = jax.jit(jax.vmap(head.apply, in_axes=(0, None)))
    rng = np.random.default_rng(seed)
    rates = ", ".join(f"{lr:g}" for lr in learning_rates)
    logging.info("%s: training %d head%s (lr %s) for %d epochs on %s examples.", what, len(learning_rates),
                 "s" if len(learning_rates) > 1 else "", rates, epochs, f"{len(x):,}")
    progress = console.Progress(what, epochs, "epochs")
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            params, opt_state = step(params, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        progress.update(epoch + 1)
    logits = np.concatenate([np.asarray(predict(params, jnp.asarray(x_eval[i:i + 1024])))
                             for i in range(0, len(x_eval), 1024)], axis=1)
    return {float(lr): topk_accuracy(logits[h], y_eval) for h, lr in enumerate(learning_rates)}


def sweep(head: nn.Module, train, eval_, *, learning_rates, extensions: int, prefix: str, **options) -> dict:
    """`train_probes` over `learning_rates`, then, while the best lies at an edge of what was tried,
    two more rates beyond that edge on the grid's own ratio, at most `extensions` times: a fixed
    sweep often peaks at its largest rate on small data (Fashion-MNIST encoders all did at 1.0).
    Every head sees the same batches (one seed), so an extended rate scores as it would have in the
    wider sweep. Returns `best`'s summary plus `<prefix>_best_lr_at_edge` (True when the extensions
    ran out with the best still at an edge) and `<prefix>_sweep` ({lr: top1}, for results.json)."""
    what = f"{prefix} probe"
    results = train_probes(head, train, eval_, learning_rates=learning_rates, what=what, **options)
    for _ in range(extensions if len(results) > 1 else 0):
        side = _edge(results)
        if side == 0:
            break
        tried = sorted(results)
        ratio = (tried[-1] / tried[0]) ** (1 / (len(tried) - 1))
        edge = tried[-1] if side > 0 else tried[0]
        logging.info("%s: the best rate, %g, is the %s tried; two more beyond it.", what, edge,
                     "largest" if side > 0 else "smallest")
        results.update(train_probes(head, train, eval_, learning_rates=tuple(
            float(f"{edge * ratio ** (side * i):.6g}") for i in (1, 2)), what=what, **options))
    summary = best(results, prefix)
    return {**summary, f"{prefix}_best_lr_at_edge": len(results) > 1 and _edge(results) != 0,
            f"{prefix}_sweep": {lr: acc["top1"] for lr, acc in sorted(results.items())}}


def _edge(results: dict) -> int:
    """+1 if the best top-1 is reached only at the largest rate tried, -1 only at the smallest, 0 if
    also inside the range (a flat sweep gives no direction to go)."""
    top = max(acc["top1"] for acc in results.values())
    winners = {lr for lr, acc in results.items() if acc["top1"] == top}
    low, high = min(results), max(results)
    if any(low < lr < high for lr in winners) or {low, high} <= winners:
        return 0
    return 1 if high in winners else -1


def best(results: dict, prefix: str) -> dict:
    lr, acc = max(sorted(results.items()), key=lambda kv: kv[1]["top1"])   # ties: the smallest rate
    return {**{f"{prefix}_{k}": v for k, v in acc.items()}, f"{prefix}_best_lr": lr}
