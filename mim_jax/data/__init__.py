"""Data: TFDS array_record sources -> Grain pipelines -> globally sharded jax.Arrays."""
