"""Cloud TPU slices without a TPU: their compile-only devices (topology), the collectives of a
compiled step (collectives) and the exact train and evaluation steps compiled for them (steps).
`python -m mim_jax.aot` is the command built on them."""
