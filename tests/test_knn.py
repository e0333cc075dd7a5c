"""kNN evaluator: known answers, NumPy reference, sharded == single device."""
import functools
import logging

import jax
import numpy as np

from mim_jax import parallel
from mim_jax.evaluators import knn
from mim_jax.runtime import console


def numpy_knn(queries, bank, labels, num_classes, k, t):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sims = q @ b.T
    scores = np.zeros((len(q), num_classes))
    for i, row in enumerate(sims):
        for j in np.argsort(-row)[:k]:
            scores[i, labels[j]] += np.exp(row[j] / t)
    return scores


def test_sharded_knn_matches_numpy_and_single_device():
    rng = np.random.default_rng(0)
    bank, labels = rng.normal(size=(203, 16)), rng.integers(0, 5, 203)   # 203: padding is exercised
    queries = rng.normal(size=(7, 16))
    expected = numpy_knn(queries, bank, labels, 5, 10, 0.07)
    sharded = knn.KnnClassifier(bank, labels, 5, parallel.make_mesh([("data", 2), ("fsdp", 4)]), k=10)
    single = knn.KnnClassifier(bank, labels, 5, parallel.make_mesh([("data", 1)], jax.devices()[:1]), k=10)
    np.testing.assert_allclose(np.asarray(sharded.predict(queries)), expected, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(single.predict(queries)), np.asarray(sharded.predict(queries)), rtol=1e-5)


def test_bank_containing_the_queries_returns_their_labels():
    rng = np.random.default_rng(1)
    bank, labels = rng.normal(size=(64, 32)), rng.integers(0, 10, 64)
    classifier = knn.KnnClassifier(bank, labels, 10, parallel.make_mesh([("data", -1)]), k=1)
    assert knn.topk_accuracy(classifier.predict(bank), labels)["top1"] == 1.0


def test_encoder_restored_from_a_pretraining_workdir_gives_identical_features(tmp_path, monkeypatch, caplog):
    from conftest import tiny_mae_config

    from mim_jax.data import pipeline
    from mim_jax.evaluators import encoder as encoder_lib
    from mim_jax.methods import get_method
    from mim_jax.training import train

    source = pipeline.SyntheticSource(64, image_shape=(16, 16, 1), seed=0)
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: source)
    config = tiny_mae_config(total_steps=2, ckpt_steps=2)
    state = train.train_and_evaluate(config, str(tmp_path))
    mesh = parallel.make_mesh(config.mesh)
    encoder = encoder_lib.load(str(tmp_path), mesh, feature="cls+patch_mean")
    assert "step 2" in encoder.description
    images = np.random.default_rng(0).normal(size=(8, 16, 16, 1)).astype(np.float32)
    out = jax.jit(get_method(config).encode)(state.params, images)  # same compiled maths
    expected = np.concatenate([out["cls"], out["patch_mean"]], axis=-1)
    np.testing.assert_allclose(np.asarray(encoder.features(images)), expected, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(console, "Progress", functools.partial(console.Progress, every_s=0.0))   # every tenth
    with caplog.at_level(logging.INFO):
        feats, labels = encoder_lib.extract(encoder, source, mesh, batch_size=16, what="train features",
                                            transform=pipeline.EvalTransform(16, (0.5,), (0.25,)))
    assert feats.shape == (64, 64) and labels.shape == (64,)
    assert [m.split(",")[0] for m in caplog.messages if m.startswith("train features")] == [
        "train features: 16/64 images (25%)", "train features: 32/64 images (50%)", "train features: 48/64 images (75%)"]


def test_an_evaluation_batch_smaller_than_the_mesh_extracts_every_example_once():
    """A pod has more devices than a periodic evaluation's batch (512 chips, batch 256): the batch is
    rounded up to one image per device and the padding dropped."""
    from mim_jax.data import pipeline
    from mim_jax.evaluators import encoder as encoder_lib
    mesh = parallel.make_mesh((("data", -1), ("fsdp", 1)))
    assert encoder_lib.extraction_batch(4, mesh) == 8 and encoder_lib.extraction_batch(9, mesh) == 16
    source = pipeline.SyntheticSource(13, image_shape=(8, 8, 1), seed=0)
    encoder = encoder_lib.Encoder(features=jax.jit(lambda images: images.reshape(len(images), -1)), config=None,
                                  description="pixels")
    feats, labels = encoder_lib.extract(encoder, source, mesh, batch_size=4,
                                        transform=pipeline.EvalTransform(8, (0.5,), (0.25,)))
    expected = [pipeline.EvalTransform(8, (0.5,), (0.25,))(source[i], None) for i in range(13)]
    np.testing.assert_allclose(feats, np.stack([e["image"].reshape(-1) for e in expected]), rtol=1e-6)
    np.testing.assert_array_equal(labels, [e["label"] for e in expected])


def test_a_standalone_evaluation_says_what_it_extracts(tmp_path, monkeypatch, caplog):
    """Between loading the weights and the result, the console says which features of how many images."""
    from configs import knn as knn_config
    from mim_jax.data import pipeline
    from mim_jax.evaluators import run
    monkeypatch.setattr(pipeline, "open_source",
                        lambda *a, **k: pipeline.SyntheticSource(48, image_shape=(28, 28, 1), seed=0))
    config = knn_config.get_config("init=tests/fixtures/checkpoints_9ddba71/mae")
    config.update(k=2, batch_size=16, max_train_examples=32)
    with caplog.at_level(logging.INFO):
        run.evaluate(config, tmp_path)
    assert "Extracting cls features of 32 images of fashion_mnist/train." in caplog.messages
    assert "Extracting cls features of 48 images of fashion_mnist/test." in caplog.messages
