"""Times the jitted train step on synthetic on-device batches (no input pipeline).

  python -m mim_jax.bench --config=configs/mae.py:variant=B/16 --config.input.batch_size=256 \
      --config.model.attention_impl=cudnn

Prints images/s, ms/step, TFLOP/s per device and MFU (on devices with a known peak), the time to
lower and compile the step, and the analytic FLOP count next to XLA's own cost analysis of the
compiled step.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, as for mim_jax.main.", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed steps (after 3 warm-up steps).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def benchmark(config, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from mim_jax import flops, parallel, state as state_lib
    from mim_jax.methods import get_method

    mesh = parallel.make_mesh(config.mesh)
    bs = config.input.batch_size
    method = get_method(config, num_examples=bs)   # per-example state (ContrastiveCrop boxes) for one batch
    setup = state_lib.build(config, method, mesh, total_steps=10_000, warmup_steps=100, global_batch_size=bs)
    state = setup.create(jax.random.key(0))
    sharding = parallel.batch_sharding(mesh)

    def synthetic(i, spec):
        if jnp.issubdtype(spec.dtype, jnp.floating):
            return jax.random.normal(jax.random.key(1 + i), spec.shape, spec.dtype)
        return jnp.arange(spec.shape[0], dtype=spec.dtype) % bs
    batch = {name: jax.device_put(synthetic(i, spec), sharding)
             for i, (name, spec) in enumerate(sorted(method.batch_spec(bs).items()))}

    start = time.perf_counter()
    compiled = setup.lower_step(state, setup.frozen, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0

    # The timed steps run this executable: the step compiled once, as measured.
    for _ in range(3):
        state, m = compiled(state, setup.frozen, batch)
    jax.block_until_ready(m)
    throughput = flops.Throughput(bs, method.train_flops_per_example(), config.peak_flops)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, setup.frozen, batch)
        throughput.add_step(0.0)
    jax.block_until_ready((state, m))
    elapsed = time.perf_counter() - start
    report = throughput.report()
    report.update(ms_per_step=1e3 * elapsed / steps, compile_s=compile_s, device=jax.devices()[0].device_kind,
                  devices=jax.device_count(), batch_size=bs,
                  analytic_tflops_per_step=method.train_flops_per_example() * bs / 1e12,
                  # XLA counts per device of an SPMD program; scale to the whole step.
                  xla_tflops_per_step=xla_flops * jax.device_count() / 1e12)
    return report


def main(argv):
    del argv
    report = benchmark(FLAGS.config, FLAGS.steps)
    for key, value in report.items():
        print(f"{key:>26}: {value:.4g}" if isinstance(value, float) else f"{key:>26}: {value}")


if __name__ == "__main__":
    app.run(main)
