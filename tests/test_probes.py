"""Probes on synthetic features where the answer is known."""
import numpy as np

from mim_jax.evaluators import probes


def separable(n, d=8, classes=3, seed=0):
    centres = np.random.default_rng(123).normal(size=(classes, d)) * 4   # shared by all splits
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y.astype(np.int32)


def test_linear_probe_reaches_100_percent_on_separable_features():
    (x, y), (xe, ye) = separable(512), separable(256, seed=1)
    x, xe = probes.standardize(x, xe)
    results = probes.train_probes(probes.LinearHead(3), (x, y), (xe, ye), learning_rates=(1e-4, 0.1),
                                  epochs=5, batch_size=64)
    assert results[0.1]["top1"] == 1.0
    summary = probes.best(results, "linear")
    assert summary["linear_top1"] == 1.0 and summary["linear_best_lr"] in (1e-4, 0.1)


def test_attentive_probe_finds_the_one_informative_token():
    """Only token 2 carries the class: attention pooling must learn to read it."""
    def tokens(n, seed):
        x, y = separable(n, seed=seed)
        t = np.random.default_rng(seed + 10).normal(size=(n, 5, 8)).astype(np.float32)
        t[:, 2] = x
        return t, y

    (x, y), (xe, ye) = tokens(512, 0), tokens(256, 1)
    results = probes.train_probes(probes.AttentiveHead(3, num_heads=2), (x, y), (xe, ye),
                                  learning_rates=(1e-3, 1e-2), epochs=20, batch_size=64, optimizer="adamw")
    assert probes.best(results, "attentive")["attentive_top1"] > 0.95


def test_standardize_matches_numpy():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(100, 4, 6))
    (out,) = probes.standardize(x)
    np.testing.assert_allclose(out.reshape(-1, 6).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(out.reshape(-1, 6).std(0), 1, atol=1e-3)
