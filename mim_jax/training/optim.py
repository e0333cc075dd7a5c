"""Optimizer from config: AdamW (decay on kernels, or on all but 1-D params), warmup + cosine,
clipping, per-group settings."""
from __future__ import annotations

import re

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import optax


def learning_rate(optax_config, global_batch_size: int) -> float:
    """MAE/BEiT convention: lr = base_lr * batch / lr_scale_batch; lr_scale_batch=None: absolute."""
    scale = optax_config.lr_scale_batch
    return optax_config.base_lr * (global_batch_size / scale if scale else 1.0)


def schedule(optax_config, peak_lr: float, total_steps: int, warmup_steps: int, decay_steps: int | None = None):
    """Linear warmup to `peak_lr`, then cosine to `min_lr` over `decay_steps` (default: the rest of
    training), constant afterwards.

    `cosine_truncation` < 1 (CAPI: 0.8) runs only that fraction of the half cosine period over the
    decay, ending at min_lr + (peak - min_lr) * (1 + cos(pi * truncation)) / 2 instead of min_lr."""
    decay_steps = decay_steps or total_steps
    truncation = optax_config.cosine_truncation
    length = max(decay_steps - warmup_steps, 1)
    min_lr = optax_config.min_lr

    def cosine(step):
        progress = jnp.clip(step / length, 0.0, 1.0)
        return min_lr + (peak_lr - min_lr) * 0.5 * (1 + jnp.cos(jnp.pi * truncation * progress))

    warmup = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
    return optax.join_schedules([warmup, cosine], [warmup_steps])


def weight_decay_mask(params, rule: str = "kernels"):
    """Which parameters get weight decay.

    'kernels' (MAE, timm): matmul kernels only; norms, biases, LayerScale, tokens and positions
    are exempt. 'not_1d' (BEiT/CAE `optim_factory`): everything but 1-D parameters, so the CLS
    and mask tokens ([1, 1, D]) are decayed too.
    """
    flat = traverse_util.flatten_dict(params)
    if rule == "kernels":
        decide = lambda path, leaf: path[-1] == "kernel"   # noqa: E731
    elif rule == "not_1d":
        decide = lambda path, leaf: getattr(leaf, "ndim", 0) > 1   # noqa: E731  (MaskedNode: another group)
    elif rule == "all":    # e.g. a separate optimizer's params (CAPI's clustering head, bias included)
        decide = lambda path, leaf: True                    # noqa: E731
    else:
        raise ValueError(f"Unknown weight-decay rule {rule!r} (config.optax.decay_rule): "
                         "use 'kernels', 'not_1d' or 'all'.")
    return traverse_util.unflatten_dict({path: decide(path, leaf) for path, leaf in flat.items()})


def _adamw(lr, group_config, params):
    rule = group_config.decay_rule
    return optax.adamw(lr, b1=group_config.b1, b2=group_config.b2, eps=group_config.eps,
                       weight_decay=group_config.weight_decay, mask=lambda p: weight_decay_mask(p, rule))


def param_labels(params, optax_config):
    """The optimizer group of every parameter, by its path ('encoder/embedding/kernel'): the group
    of the first `(regex, group)` of `optax_config.param_groups` whose regex matches the whole
    path, else 'default' (big_vision's regex schedules). None when no rules are configured. A rule
    that matches no parameter is an error (a typo would otherwise silently change nothing)."""
    rules = tuple(optax_config.param_groups)
    if not rules:
        return None
    compiled = [(re.compile(pattern), group) for pattern, group in rules]
    used = set()

    def label(path):
        name = "/".join(str(p) for p in path)
        for i, (regex, group) in enumerate(compiled):
            if regex.fullmatch(name):
                used.add(i)
                return group
        return "default"

    flat = traverse_util.flatten_dict(params)
    labels = traverse_util.unflatten_dict({path: label(path) for path in flat})
    unused = [rules[i][0] for i in range(len(rules)) if i not in used]
    if unused:
        raise ValueError(f"config.optax.param_groups patterns {unused} match no parameter (paths look like "
                         f"{'/'.join(str(p) for p in next(iter(flat)))!r}).")
    return labels


def make_optimizer(optax_config, params, lr_schedule):
    """Routes params (`param_labels`) to `optax_config.groups[name]`, each group overriding
    b1/b2/eps/weight_decay and scaling the lr by `lr_mult`; group 'frozen' gets no updates at all."""
    labels = param_labels(params, optax_config)
    if labels is None:
        tx = _adamw(lr_schedule, optax_config, params)
    else:
        transforms = {"default": _adamw(lr_schedule, optax_config, params), "frozen": optax.set_to_zero()}
        for name, group in optax_config.groups.items():
            merged = optax_config.copy_and_resolve_references()
            merged.update({k: v for k, v in group.items() if k != "lr_mult"})
            mult = group.get("lr_mult", 1.0)
            transforms[name] = _adamw(lambda step, m=mult: m * lr_schedule(step), merged, params)
        unknown = set(jax.tree.leaves(labels)) - set(transforms)
        if unknown:
            raise ValueError(f"Parameter groups {sorted(unknown)} have no entry in config.optax.groups.")
        tx = optax.multi_transform(transforms, labels)
    if optax_config.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(optax_config.clip_norm), tx)
    return tx
