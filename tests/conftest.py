"""Test setup: 8 virtual CPU devices (set before jax is imported) and parsed absl flags."""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the whole session, shared by pytest-xdist's workers and the
# runs the tests start as subprocesses (mim_jax.runtime.compile_cache honours the variable): many tests
# build the same small programs, and compiling dominates their time. Every program is cached.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mim_jax_tests_xla_cache_")
    _SESSION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import sys  # noqa: E402

# PyPI's CUDA build of torch (what timm's torchvision needs) ships triton, which segfaults when it
# is loaded after TensorFlow (TFDS imports it) in the same process; torchvision's import pulls it in
# through torch._dynamo. Nothing here needs triton on the CPU, so it is kept from loading.
sys.modules.setdefault("triton", None)

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain 0.2.18 reads an absl flag in mp_prefetch; outside absl.app it must be marked parsed.
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end checks (run alone with -m slow)")


def pytest_unconfigure(config):
    if "_SESSION_CACHE" in globals():   # only the process that made it (the controller under xdist)
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def tiny_mae_config(**overrides):
    """configs/mae.py:local shrunk to a model that compiles in seconds (unit tests only)."""
    from configs import mae
    c = mae.get_config("local")
    c.input.update(image_size=16, batch_size=16, num_workers=0, crop_scale=(0.5, 1.0))
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
    c.decoder.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.total_steps = 6
    c.log_steps = 2
    c.ckpt_steps = 3
    c.optax.warmup_steps = 2
    c.evals = {}
    c.update_from_flattened_dict(overrides)
    return c


def synthetic_batches(config, n, image_shape=(16, 16, 1), num_examples=256):
    """`n` host batches of a synthetic source through the method's own train transform, as the
    loss sees them: the workers' uint8 images normalised (the train step does it on the device;
    equal to rounding, tests/test_data.py)."""
    from mim_jax.data import pipeline, transforms
    from mim_jax.methods import get_method
    source = pipeline.SyntheticSource(num_examples, image_shape=image_shape, num_classes=10, seed=0)
    it = pipeline.train_iterator(source, global_batch_size=config.input.batch_size, seed=0, process_index=0,
                                 process_count=1, transform=get_method(config).train_transform())

    def normalised(batch):
        return {k: transforms.normalize(v, config.input.mean, config.input.std) if v.dtype == "uint8" and v.ndim == 4
                else v for k, v in batch.items()}
    return [normalised(next(it)) for _ in range(n)]


def run_steps(config, mesh, batches):
    """Fresh state on `mesh`, one train step per batch: (final state, per-step metrics on host)."""
    import jax

    from mim_jax import parallel
    from mim_jax.methods import get_method
    from mim_jax.training import state as state_lib
    setup = state_lib.build(config, get_method(config), mesh, total_steps=10, warmup_steps=2,
                            global_batch_size=config.input.batch_size)
    state, history = setup.create(jax.random.key(0)), []
    for b in batches:
        state, m = setup.train_step(state, setup.frozen, parallel.host_batch_to_global(b, mesh))
        history.append(jax.device_get(m))
    return state, history


FASHION_MNIST_FILES = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
    """TFDS data dir with fashion_mnist prepared offline from the Debian package (about 20 s)."""
    if not os.path.exists(FASHION_MNIST_FILES):
        pytest.skip("apt-get install dataset-fashion-mnist (installed by .ci/run) to run this test")
    from mim_jax.data.fashion_mnist import prepare_fashion_mnist
    data_dir = tmp_path_factory.mktemp("tfds")
    prepare_fashion_mnist(str(data_dir))
    return str(data_dir)
