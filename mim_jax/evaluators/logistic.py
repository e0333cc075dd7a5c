"""L2-regularised multinomial logistic regression, fitted to convergence by L-BFGS (`optax.lbfgs`)
on the full batch, with the rows sharded over the mesh: the linear classifier of the segmentation
probe. CAPI fits cuML's LogisticRegression (L-BFGS); the objective is scikit-learn's,

    C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2       (the intercept b is not penalised),

minimised here divided by C * n (mean cross-entropy + ||W||^2 / (2 C n)): the same minimiser,
with gradients of order one in float32.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mim_jax.evaluators.knn import shard_rows


@dataclasses.dataclass(frozen=True)
class Fit:
    w: np.ndarray          # [D, K]
    b: np.ndarray          # [K]
    iterations: int
    grad_norm: float       # of the scaled objective when it stopped

    def logits(self, x):
        return np.asarray(x, np.float32) @ self.w + self.b


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit(x, y, valid, l2, tol, params, *, num_classes: int, max_iter: int):
    n = valid.sum()

    def objective(params):
        logp = jax.nn.log_softmax(x @ params["w"] + params["b"])
        ce = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
        return jnp.sum(jnp.where(valid, ce, 0.0)) / n + 0.5 * l2 * jnp.sum(params["w"] ** 2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state, i, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(params, updates), state, i + 1, optax.tree.norm(grad)

    carry = (params, solver.init(params), jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, jnp.float32))
    params, _, iterations, grad_norm = jax.lax.while_loop(
        lambda c: (c[2] < max_iter) & (c[3] > tol), step, carry)
    return params, iterations, grad_norm


def fit(x: np.ndarray, y: np.ndarray, *, num_classes: int, C: float, mesh, max_iter: int = 1000,
        tol: float = 1e-6, start: Fit | None = None) -> Fit:
    """Fits on rows `x` [n, D] (float) with labels `y` [n] in [0, num_classes); stops when the
    scaled objective's gradient norm is below `tol` or after `max_iter` L-BFGS steps. `start`:
    another C's solution to start from (the problem is strictly convex in W, so the minimiser is
    the same; a sweep over increasing C converges in far fewer steps from its neighbour)."""
    xs, ys, valid = shard_rows(mesh, np.asarray(x, np.float32), np.asarray(y, np.int32))
    params = {"w": np.zeros((x.shape[1], num_classes), np.float32), "b": np.zeros((num_classes,), np.float32)}
    if start is not None:
        params = {"w": start.w, "b": start.b}
    params, iterations, grad_norm = _fit(xs, ys, valid, jnp.float32(1.0 / (C * len(x))), jnp.float32(tol), params,
                                         num_classes=num_classes, max_iter=max_iter)
    return Fit(w=np.asarray(params["w"]), b=np.asarray(params["b"]), iterations=int(iterations),
               grad_norm=float(grad_norm))
