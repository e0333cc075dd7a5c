"""The MAE-style pixel decoder's token placement."""
import jax.numpy as jnp
import numpy as np

from mim_jax.models.decoder import unshuffle


def test_unshuffle_places_tokens_by_index():
    vis = jnp.arange(2 * 2 * 1, dtype=jnp.float32).reshape(2, 2, 1) + 1
    out = unshuffle(vis, jnp.full((1, 1, 1), -1.0), jnp.array([[0, 2], [1, 3]]), jnp.array([[1, 3], [0, 2]]))
    np.testing.assert_array_equal(out[..., 0], [[1, -1, 2, -1], [-1, 3, -1, 4]])


