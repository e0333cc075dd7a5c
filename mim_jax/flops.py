"""Analytic FLOP counts (a multiply-add is 2 FLOPs), peak device throughput, and the measured
images/s and MFU of a run.

Only matmuls are counted, as in MaxText/PaLM MFU accounting; a training step costs 3x the forward
pass (the backward pass computes gradients for both activations and weights).
"""
from __future__ import annotations

import time

import jax

TRAIN_MULTIPLIER = 3.0

# Dense bf16 peak FLOP/s per device (vendor figures, without sparsity).
_PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "gh200": 989e12, "a100": 312e12, "l4": 121e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


def transformer_forward(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
    """Per example: qkv (6TD^2) + scores and weighted sum (4T^2 D) + out proj (2TD^2) + MLP (4TDM)."""
    t, d = tokens, width
    return depth * (8 * t * d * d + 4 * t * t * d + 4 * t * d * mlp_dim)


def dense(tokens: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def vit_forward(encoder, num_patches: int, channels: int, block_fraction: float = 1.0) -> float:
    """Per example: a ViT-style encoder (fields patch_size, width, depth, mlp_dim and
    num_prefix_tokens) on `num_patches` patches of `channels`-channel pixels plus its prefix
    tokens: patch embedding + blocks (no final norm or heads). `block_fraction`: the share of
    examples each block's branches run on (subset drop path: 1 - rate)."""
    patch_dim = encoder.patch_size ** 2 * channels
    tokens = num_patches + encoder.num_prefix_tokens
    return (dense(num_patches, patch_dim, encoder.width)
            + block_fraction * transformer_forward(tokens, encoder.width, encoder.depth, encoder.mlp_dim))


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s for known accelerators; None (no MFU) for CPUs and unknown devices."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peak in sorted(_PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return peak
    return None


class Throughput:
    """Step time, images/s and MFU over the steps since the last report."""

    def __init__(self, global_batch_size: int, train_flops_per_example: float, peak_flops: float | None = None):
        self.batch = global_batch_size
        self.flops_per_step = train_flops_per_example * global_batch_size
        self.peak = peak_flops if peak_flops else peak_flops_per_device()
        self.devices = jax.device_count()
        self.reset()

    def reset(self):
        self._start, self._steps, self._data_wait = time.perf_counter(), 0, 0.0

    def add_step(self, data_wait: float):
        self._steps += 1
        self._data_wait += data_wait

    def report(self) -> dict:
        elapsed = time.perf_counter() - self._start
        step_time = elapsed / max(self._steps, 1)
        out = {"step_time_s": step_time, "images_per_s": self.batch / step_time,
               "images_per_s_per_device": self.batch / step_time / self.devices,
               "data_wait_fraction": self._data_wait / max(elapsed, 1e-9),
               "tflops_per_device": self.flops_per_step / step_time / self.devices / 1e12}
        if self.peak:
            out["mfu"] = self.flops_per_step / step_time / (self.devices * self.peak)
        self.reset()
        return out
