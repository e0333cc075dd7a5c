"""The training plot of a workdir's metrics."""


def test_plot_writes_a_png_of_loss_and_probe_accuracy(tmp_path):
    import json

    from mim_jax import plot
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)] + [{"step": 5, "eval/knn/knn_top1": 0.5},
                                                                   {"step": 10, "eval/knn/knn_top1": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    out = plot.plot(tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
