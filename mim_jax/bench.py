"""Times the jitted train step on synthetic on-device batches, or (`--input`) the input pipeline.

  python -m mim_jax.bench --config=configs/mae.py:variant=B/16 --config.input.batch_size=256
  python -m mim_jax.bench --input --config=configs/mae.py --config.input.num_workers=16

The step: images/s, ms/step, TFLOP/s per device and MFU (on devices with a known peak), the time
to lower and compile the step, and the analytic FLOP count next to XLA's own cost analysis of the
compiled step. The attention implementation is chosen automatically (cuDNN on GPUs where it
applies); `--config.model.attention_impl=xla` forces XLA's.

`--input`: the method's Grain training pipeline alone on the config's real TFDS data set (its
workers, its transform), and in the same run the bare reference loop on the same records (one
core: cv2 full decode, the same random-resized crop box, resize); the last line is
`input: N images/s on C cores (M per core)`.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def benchmark(config, steps: int, profile_dir: str | None = None) -> dict:
    import jax
    import jax.numpy as jnp

    from mim_jax import flops, parallel
    from mim_jax.methods import get_method, resolve_config
    from mim_jax.training import state as state_lib

    config = resolve_config(config)
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
    compiled = setup.train_step.lower(state, setup.frozen, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0

    # The timed steps run this executable: the step compiled once, as measured.
    for _ in range(3):
        state, m = compiled(state, setup.frozen, batch)
    jax.block_until_ready(m)
    throughput = flops.Throughput(bs, method.train_flops_per_example(), config.peak_flops)
    if profile_dir:
        jax.profiler.start_trace(profile_dir)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, setup.frozen, batch)
        throughput.add_step(0.0)
    jax.block_until_ready((state, m))
    elapsed = time.perf_counter() - start
    if profile_dir:
        jax.profiler.stop_trace()
    report = throughput.report()
    report.update(_memory_report(compiled))
    report.update(ms_per_step=1e3 * elapsed / steps, compile_s=compile_s, device=jax.devices()[0].device_kind,
                  devices=jax.device_count(), batch_size=bs,
                  analytic_tflops_per_step=method.train_flops_per_example() * bs / 1e12,
                  # XLA counts per device of an SPMD program; scale to the whole step.
                  xla_tflops_per_step=xla_flops * jax.device_count() / 1e12)
    return report


def _memory_report(compiled) -> dict:
    """The step's memory per device: XLA's static plan (arguments + outputs + temporaries, less
    donated buffers) and, where the runtime reports it (GPUs, TPUs), the measured peak and limit,
    whose difference is the headroom left for a larger batch."""
    import jax
    report = {}
    plan = compiled.memory_analysis()
    if plan is not None:
        total = (plan.argument_size_in_bytes + plan.output_size_in_bytes + plan.temp_size_in_bytes
                 - plan.alias_size_in_bytes)
        report["xla_memory_gib"] = total / 2 ** 30
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats and "bytes_limit" in stats:
        report["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2 ** 30
        report["memory_headroom_gib"] = (stats["bytes_limit"] - stats["peak_bytes_in_use"]) / 2 ** 30
    return report


def reference_loop(source, config, num_images: int) -> float:
    """images/s of the bare loop on one core: full cv2 decode, the pipeline's crop box, resize."""
    import numpy as np

    from mim_jax.data import decode, transforms

    inp, channels = config.input, config.input.channels
    start = time.perf_counter()
    for i in range(num_images):
        rng = np.random.default_rng([config.seed, i])
        image = decode.image(source[i % len(source)]["image"], channels)
        top, left, h, w = transforms.sample_crop_box(image.shape[0], image.shape[1], rng, inp.crop_scale,
                                                     inp.crop_ratio)
        transforms.resize(image[top:top + h, left:left + w], inp.image_size)
    return num_images / (time.perf_counter() - start)


def input_benchmark(config, batches: int) -> dict:
    """The method's training input pipeline on the config's TFDS data set, and the bare loop."""
    from mim_jax.data import pipeline
    from mim_jax.methods import get_method, resolve_config

    config = resolve_config(config)
    inp = config.input
    source = pipeline.open_source(inp.dataset, inp.split, inp.data_dir, channels=inp.channels)
    method = get_method(config, num_examples=len(source))
    it = pipeline.train_iterator(source, global_batch_size=inp.batch_size, seed=config.seed, process_index=0,
                                 process_count=1, transform=method.train_transform(), num_workers=inp.num_workers,
                                 prefetch_buffer=inp.prefetch_buffer)
    for _ in range(2):   # worker start-up
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * inp.batch_size / (time.perf_counter() - start)
    it.close()
    cores = max(inp.num_workers, 1)
    bare = reference_loop(source, config, min(batches * inp.batch_size // cores, 2000))
    return {"dataset": f"{inp.dataset}/{inp.split}", "images_per_s": rate, "cores": cores,
            "images_per_s_per_core": rate / cores, "bare_loop_images_per_s_one_core": bare,
            "pipeline_per_core_over_bare_loop": rate / cores / bare}


def main(argv):
    del argv
    if FLAGS.input:
        report = input_benchmark(FLAGS.config, FLAGS.input_batches)
        for key, value in report.items():
            print(f"{key:>34}: {value:.4g}" if isinstance(value, float) else f"{key:>34}: {value}")
        print(f"input: {report['images_per_s']:.0f} images/s on {report['cores']} cores "
              f"({report['images_per_s_per_core']:.0f} per core)")
        return
    report = benchmark(FLAGS.config, FLAGS.steps, FLAGS.profile_dir)
    for key, value in report.items():
        print(f"{key:>26}: {value:.4g}" if isinstance(value, float) else f"{key:>26}: {value}")


def define_flags(flag_values: flags.FlagValues = FLAGS):
    """Only when run as a command: importing this module (for its functions) adds no flags, so it
    imports beside mim_jax.main, whose --config it shares. tests/test_docs.py defines them on a
    fresh FlagValues to parse the documented commands."""
    config_flags.DEFINE_config_file("config", None, "Config file, as for mim_jax.main.", flag_values=flag_values,
                                    lock_config=True)
    flags.DEFINE_integer("steps", 20, "Timed steps (after 3 warm-up steps).", flag_values=flag_values)
    flags.DEFINE_bool("input", False, "Time the input pipeline instead of the train step.", flag_values=flag_values)
    flags.DEFINE_string("profile_dir", None, "Write a TensorBoard profiler trace of the timed steps here.",
                        flag_values=flag_values)
    flags.DEFINE_integer("input_batches", 20, "Timed batches of the input benchmark (after 2 warm-up batches).",
                         flag_values=flag_values)
    flags.mark_flags_as_required(["config"], flag_values=flag_values)


if __name__ == "__main__":
    define_flags()
    from mim_jax.runtime import console
    app.run(main, flags_parser=console.parse_flags)
