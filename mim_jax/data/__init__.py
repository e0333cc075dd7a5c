"""Data: TFDS array_record sources -> Grain pipelines -> globally sharded jax.Arrays.

  fashion_mnist.py  offline TFDS preparation of Fashion-MNIST (python -m mim_jax.data.fashion_mnist)
  transforms.py     numpy/cv2 augmentations (run in Grain workers: no jax)
  pipeline.py       open_source, train_iterator, eval_iterator, to_global_batch

Nothing is imported here, so a worker unpickling a transform loads only what it needs.
"""
