"""The segmentation probe: its metrics, classifiers and patch labels against independent
computations (scikit-learn, numpy float64), sharded against single-device, and the embedded task."""
import json

import jax
import numpy as np
import pytest
import sklearn.linear_model
import sklearn.metrics
from ml_collections import ConfigDict

from mim_jax import config_defaults, parallel
from mim_jax.data import fashion_mnist_mosaic, pipeline
from mim_jax.errors import UserFacingError
from mim_jax.evaluators import common, logistic, segmentation_probe as seg, views
from mim_jax.models import layers


def _mesh(devices=None):
    return parallel.make_mesh((("data", -1), ("fsdp", 1)), devices=devices)


def test_mean_iou_is_sklearns_macro_jaccard_on_the_scored_pixels():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, (4, 16, 16))
    truth[rng.random(truth.shape) < 0.2] = 255
    predicted = rng.integers(0, 7, truth.shape)       # class 6 is only predicted: it counts, with IoU 0
    keep = ~np.isin(truth, (0, 255))
    expected = sklearn.metrics.jaccard_score(truth[keep], predicted[keep], average="macro")
    assert common.mean_iou(truth, predicted, (0, 255)) == pytest.approx(expected, abs=1e-12)
    assert common.pixel_accuracy(truth, predicted, (0, 255)) == pytest.approx(np.mean(truth[keep] == predicted[keep]))
    assert common.mean_iou(truth, truth, (255,)) == 1.0


@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_logistic_regression_matches_scikit_learn(C):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(6, 4)) + rng.normal(size=(500, 4)), axis=1)
    fit = logistic.fit(x, y, num_classes=4, C=C, mesh=_mesh(), tol=1e-6)
    reference = sklearn.linear_model.LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), y)
    np.testing.assert_allclose(jax.nn.softmax(fit.logits(x)), reference.predict_proba(x), atol=1e-4)


def _knn_reference(bank, bank_pixels, queries, k, distance):
    bank, queries = bank.astype(np.float64), queries.astype(np.float64)
    if distance == "cosine":
        bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        order = np.argsort(-(queries @ bank.T), axis=1, kind="stable")
    else:
        order = np.argsort(((queries[:, None] - bank[None]) ** 2).sum(-1), axis=1, kind="stable")
    neighbours = bank_pixels[order[:, :k]]                      # [q, k, p*p]
    counts = (neighbours[..., None] == np.arange(bank_pixels.max() + 1)).sum(1)
    return counts.argmax(-1)


@pytest.mark.parametrize("distance", ["cosine", "L2"])
def test_patch_knn_takes_each_pixels_mode_over_the_neighbours_like_a_float64_reference(distance):
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(203, 5)).astype(np.float32)          # not a multiple of the 8 devices
    pixels = rng.integers(0, 4, (203, 4))
    queries = rng.normal(size=(37, 5)).astype(np.float32)
    knn = seg.PatchKnn(bank, pixels, distance=distance, ks=(1, 3, 10), num_values=4, mesh=_mesh())
    predicted = knn.predict(queries)
    for k in (1, 3, 10):
        np.testing.assert_array_equal(predicted[k], _knn_reference(bank, pixels, queries, k, distance))
    single = seg.PatchKnn(bank, pixels, distance=distance, ks=(1, 3, 10), num_values=4, mesh=_mesh(jax.devices()[:1]))
    for k, labels in single.predict(queries).items():
        np.testing.assert_array_equal(labels, predicted[k])


def test_patch_pixels_follow_the_encoders_token_order():
    maps = np.random.default_rng(3).integers(0, 9, (2, 12, 12))
    expected = np.asarray(layers.patchify(maps[..., None].astype(np.float32), 4)).astype(int)
    np.testing.assert_array_equal(seg.patch_pixels(maps, 3), expected.reshape(-1, 16))
    assert seg.mode(np.asarray([[2, 1, 1, 2, 3], [5, 5, 0, 0, 0]]), 6).tolist() == [1, 0]   # ties: the smallest


def _probe_config(**overrides):
    c = ConfigDict(dict(config_defaults.EVALUATORS["segmentation_probe"], seed=0))
    c.update(dict(logreg_C=(0.1, 10.0), knn_k=(1, 3)), **overrides)
    return c


def _separable_task(rng, directions, images, grid=4, patch=2, ignore=255):
    """Patch tokens that say their class (its direction plus noise), label maps that agree, with
    each image's first row of patches ignored (those are left out of fitting)."""
    classes = len(directions)
    patch_class = rng.integers(0, classes, (images, grid, grid))
    tokens = directions[patch_class] + 0.1 * rng.normal(size=(images, grid, grid, 16))
    maps = np.repeat(np.repeat(patch_class, patch, 1), patch, 2)
    maps[:, :patch, :] = ignore
    return tokens.reshape(images, grid * grid, 16).astype(np.float32), maps


def test_the_probe_reaches_99_percent_miou_on_a_task_separable_in_patch_space():
    rng = np.random.default_rng(4)
    directions = rng.normal(size=(5, 16))
    feats = {"train": _separable_task(rng, directions, 60), "eval": _separable_task(rng, directions, 20)}
    view = views.View(dataset="synthetic", data_dir=None, splits={}, transform=None, num_classes=5,
                      ignore_labels=(255,))
    results = seg.evaluate(_probe_config(), feats, view, _mesh())
    assert results["seg_knn_miou"] > 0.99 and results["seg_logreg_miou"] > 0.99, results
    assert set(results["seg_logreg_sweep"]) == {"C=0.1", "C=10"}
    assert results["seg_knn_best"].startswith("k=")
    with pytest.raises(UserFacingError, match=r"unknown \['svm'\]"):
        seg.evaluate(_probe_config(classifiers=("knn", "svm")), feats, view, _mesh())


def test_upsampled_logits_are_bilinear_between_patch_centres():
    logits = np.zeros((4, 2), np.float32)
    logits[[0, 2], 0] = 1.0          # left column of a 2x2 grid says class 0, right column class 1
    logits[[1, 3], 1] = 1.0
    labels = seg._upsampled(logits, 2, 8).reshape(2, 2, 4, 4).transpose(0, 2, 1, 3).reshape(8, 8)
    assert (labels[:, :4] == 0).all() and (labels[:, 4:] == 1).all()


def test_mosaic_labels_each_bright_pixel_with_its_items_class():
    items = np.zeros((4, 28, 28), np.uint8)
    items[:, 10:20, 10:20] = 200
    items[3, 0, 0] = fashion_mnist_mosaic.THRESHOLD        # not brighter than the threshold
    image, labels = fashion_mnist_mosaic.mosaic(items, [0, 3, 7, 9])
    assert image.shape == labels.shape == (56, 56, 1)
    assert labels[15, 15, 0] == 1 and labels[15, 43, 0] == 4 and labels[43, 15, 0] == 8 and labels[43, 43, 0] == 10
    assert labels[28, 28, 0] == 0 and (labels > 0).sum() == 4 * 100


def test_the_dense_view_resizes_images_bicubic_and_label_maps_nearest():
    rng = np.random.default_rng(5)
    record = {"image": rng.integers(0, 256, (10, 10, 1), dtype=np.uint8),
              "segmentation": np.repeat(np.repeat(rng.integers(0, 4, (5, 5)), 2, 0), 2, 1).astype(np.uint8)[..., None]}
    out = pipeline.DenseTransform(resolution=20, mean=(0.5,), std=(0.25,))(record, None)
    assert out["image"].shape == (20, 20, 1) and out["label"].shape == (20, 20)
    np.testing.assert_array_equal(out["label"], np.repeat(np.repeat(record["segmentation"][..., 0], 2, 0), 2, 1))


def test_a_probe_without_a_dense_data_set_says_what_to_set():
    config = _probe_config()
    inp = ConfigDict(dict(dataset="cifar10", channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, data_dir=None))
    with pytest.raises(UserFacingError, match="dense_dataset="):
        seg.view(config, inp)
    config.dense_dataset = "fashion_mnist_mosaic"
    with pytest.raises(UserFacingError, match="1-channel images; this encoder takes 3"):
        seg.view(config, inp)


def test_patch_pca_projects_on_the_principal_components_like_scikit_learn():
    import sklearn.decomposition

    from mim_jax.evaluators import patch_pca
    x = np.random.default_rng(6).normal(size=(300, 12)) * np.linspace(3, 0.5, 12)
    ours = patch_pca.principal_components(x, 3)
    theirs = sklearn.decomposition.PCA(n_components=3).fit_transform(x)
    theirs = theirs * np.sign((theirs ** 3).mean(0)) / (theirs[:, 0] * np.sign((theirs[:, 0] ** 3).mean())).std()
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    assert ((ours ** 3).mean(0) > 0).all() and ours[:, 0].std() == pytest.approx(1.0)


def test_patch_pca_blacks_out_the_side_of_the_first_component_that_holds_the_border():
    from mim_jax.evaluators import patch_pca
    rng = np.random.default_rng(7)
    centre = np.zeros((6, 6), bool)
    centre[2:4, 2:4] = True
    tokens = np.where(centre.ravel()[None, :, None], 5.0, 0.0) + 0.1 * rng.normal(size=(3, 36, 8))
    colours = patch_pca.pca_rgb(tokens)
    assert colours.shape == (3, 6, 6, 3)
    assert (colours[:, ~centre] == 0).all() and (colours[:, centre].sum(-1) > 0).all()
    assert (patch_pca.pca_rgb(tokens, background=False)[:, ~centre].sum(-1) > 0).any()


def test_a_sharded_extraction_of_patch_tokens_and_label_maps_equals_a_single_device_one():
    from conftest import tiny_mae_config

    from mim_jax.evaluators import encoder as encoder_lib
    config = tiny_mae_config()
    rng = np.random.default_rng(8)
    records = [{"image": rng.integers(0, 256, (20, 20, 1), dtype=np.uint8),
                "segmentation": rng.integers(0, 5, (20, 20, 1), dtype=np.uint8)} for _ in range(11)]
    transform = pipeline.DenseTransform(resolution=16, mean=config.input.mean, std=config.input.std)
    out = []
    for mesh in (_mesh(), _mesh(jax.devices()[:1])):
        encoder = encoder_lib.load("random", mesh, feature="patch_tokens", base_config=config)
        out.append(encoder_lib.extract(encoder, records, mesh, batch_size=8, transform=transform))
    (sharded, maps), (single, single_maps) = out
    assert sharded.shape == (11, 16, 32) and maps.shape == (11, 16, 16)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(maps, single_maps)


CONFIG_WITH_A_PERIODIC_SEGMENTATION_PROBE = '''
from configs import mae
from mim_jax import config_defaults


def get_config(arg=None):
    c = mae.get_config("local")
    c.evals = {}
    c.evals.seg = config_defaults.periodic_eval("segmentation_probe", every_epochs=None, every_steps=2,
                                                max_train_examples=48, max_eval_examples=16, train_subsampling=4)
    return c
'''


@pytest.mark.slow
def test_pre_training_runs_the_segmentation_probe_periodically_on_the_embedded_dense_task(tmp_path,
                                                                                          fashion_mnist_dir):
    from test_e2e import TINY, run_main
    fashion_mnist_mosaic.prepare(fashion_mnist_dir, train_size=48, test_size=16)
    config_file = tmp_path / "mae_with_segmentation.py"
    config_file.write_text(CONFIG_WITH_A_PERIODIC_SEGMENTATION_PROBE)
    workdir = tmp_path / "run"
    tiny = [flag for flag in TINY if not flag.startswith("--config.evals.")]   # this config has only `seg`
    out = run_main(workdir, fashion_mnist_dir, "--config.total_steps=4", *tiny, config=str(config_file))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    probes = {r["step"]: r for r in rows if "eval/seg/seg_knn_miou" in r}
    assert sorted(probes) == [2, 4], rows
    for row in probes.values():
        assert 0 < row["eval/seg/seg_knn_miou"] <= 1 and 0 < row["eval/seg/seg_logreg_acc"] <= 1
    assert list(workdir.glob("events.out.tfevents*"))
