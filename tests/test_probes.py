"""Probes on synthetic features where the answer is known."""
import functools
import logging

import numpy as np

from mim_jax.evaluators import probes
from mim_jax.runtime import console


def separable(n, d=8, classes=3, seed=0, spread=4.0):
    centres = np.random.default_rng(123).normal(size=(classes, d)) * spread   # shared by all splits
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


def _peaked_at(optimum: float):
    """A stand-in for training: top-1 falls off with the distance from `optimum` in decades."""
    def train(head, train, eval_, *, learning_rates, **options):
        return {float(lr): {"top1": float(np.exp(-np.log10(lr / optimum) ** 2)), "top5": 1.0} for lr in learning_rates}
    return train


def test_a_sweep_whose_best_is_at_an_edge_is_extended_until_the_best_is_inside(monkeypatch):
    monkeypatch.setattr(probes, "train_probes", _peaked_at(7.0))
    grid = (0.01, 0.03, 0.1, 0.3, 1.0)
    summary = probes.sweep(None, None, None, learning_rates=grid, extensions=3, prefix="linear")
    tried = sorted(summary["linear_sweep"])
    np.testing.assert_allclose(tried[5:], [10 ** 0.5, 10.0, 10 ** 1.5, 100.0], rtol=1e-5)   # the grid's ratio, 6 digits
    np.testing.assert_allclose(summary["linear_best_lr"], 10.0)
    assert summary["linear_best_lr_at_edge"] is False
    # Out of extensions with the best still at the edge: said so.
    summary = probes.sweep(None, None, None, learning_rates=grid, extensions=1, prefix="linear")
    assert len(summary["linear_sweep"]) == 7 and summary["linear_best_lr_at_edge"] is True
    # Downwards too; no extensions for a single rate or an interior best.
    monkeypatch.setattr(probes, "train_probes", _peaked_at(1e-4))
    summary = probes.sweep(None, None, None, learning_rates=grid, extensions=3, prefix="linear")
    assert min(summary["linear_sweep"]) < 1e-4 < summary["linear_best_lr"] * 2 and not summary["linear_best_lr_at_edge"]
    assert len(probes.sweep(None, None, None, learning_rates=(0.1,), extensions=3, prefix="p")["p_sweep"]) == 1
    monkeypatch.setattr(probes, "train_probes", _peaked_at(0.1))
    assert len(probes.sweep(None, None, None, learning_rates=grid, extensions=3, prefix="p")["p_sweep"]) == 5


def test_an_extended_rate_scores_as_it_would_in_the_wider_sweep():
    (x, y), (xe, ye) = separable(512, spread=1.0), separable(512, seed=1, spread=1.0)   # overlapping classes
    x, xe = probes.standardize(x, xe)
    options = dict(epochs=2, batch_size=64, seed=0)
    summary = probes.sweep(probes.LinearHead(3), (x, y), (xe, ye), learning_rates=(1.0, 3.0, 10.0), extensions=2,
                           prefix="linear", **options)
    tried = tuple(sorted(summary["linear_sweep"]))
    assert len(tried) > 3, summary   # extended
    wide = probes.train_probes(probes.LinearHead(3), (x, y), (xe, ye), learning_rates=tried, **options)
    np.testing.assert_allclose([summary["linear_sweep"][lr] for lr in tried], [wide[lr]["top1"] for lr in tried],
                               atol=2 / 512)


def test_probe_training_says_what_it_trains_and_its_progress(monkeypatch, caplog):
    monkeypatch.setattr(console, "Progress", functools.partial(console.Progress, every_s=0.0))   # every tenth
    (x, y), (xe, ye) = separable(256), separable(64, seed=1)
    with caplog.at_level(logging.INFO):
        probes.train_probes(probes.LinearHead(3), (x, y), (xe, ye), learning_rates=(1e-4, 1e-3), epochs=3,
                            batch_size=64, what="linear probe")
    assert [m.split(",")[0] for m in caplog.messages] == [
        "linear probe: training 2 heads (lr 0.0001", "linear probe: 1/3 epochs (33%)", "linear probe: 2/3 epochs (66%)"]
    assert caplog.messages[0].endswith(" 0.001) for 3 epochs on 256 examples.")


def test_a_sweep_says_when_it_extends(monkeypatch, caplog):
    monkeypatch.setattr(probes, "train_probes", _peaked_at(7.0))
    with caplog.at_level(logging.INFO):
        probes.sweep(None, None, None, learning_rates=(0.1, 1.0), extensions=1, prefix="linear")
    assert caplog.messages == ["linear probe: the best rate, 1, is the largest tried; two more beyond it."]
