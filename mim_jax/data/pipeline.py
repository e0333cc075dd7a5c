"""TFDS array_record sources -> Grain MapDataset pipelines with process-count-invariant streams.

The global training stream is one seeded shuffle of the source per epoch, repeated forever.
Global batch s is stream positions [s*B, (s+1)*B); process p of P reads the contiguous slice
[s*B + p*b, s*B + (p+1)*b) with b = B/P. This is the only place data is split between processes
(no split_for_jax_process, no ShardByJaxProcess on top), so concatenating the processes' batches
gives exactly the one-process batch, and augmentations are seeded by stream position: the same
example gets the same crop on any number of hosts, workers or after a resume.

Everything except `to_global_batch` runs in Grain worker processes too: no jax calls here.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

import grain
import numpy as np

from mim_jax.data import decode, transforms
from mim_jax.errors import UserFacingError

INT32_MAX = 2**31 - 1
# Key under which a transform finds its record's stable index in the source (per-example state such
# as CMAE's ContrastiveCrop boxes is stored by it).
SOURCE_INDEX = "_source_index"


def _how_to_prepare(name: str, data_dir: str | None) -> str:
    flag = f" --data_dir={data_dir}" if data_dir else ""
    if name == "fashion_mnist":
        return f"python -m mim_jax.data.fashion_mnist{flag}"
    if name.startswith("imagenet2012"):
        import tensorflow_datasets as tfds
        root = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
        return (f"download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org) into "
                f"{os.path.join(root, 'downloads', 'manual')}/, then run `tfds build {name} "
                f"--file_format=array_record{flag}`")
    return f"`tfds build {name} --file_format=array_record{flag}`"


def _unknown_dataset(name: str, data_dir: str | None, where: str) -> str:
    """Neither prepared in `where` nor a data set TFDS can build: most likely a misspelled name."""
    import difflib

    import tensorflow_datasets as tfds
    root = os.path.expanduser(where)
    prepared = sorted(e.name for e in os.scandir(root) if e.is_dir()) if os.path.isdir(root) else []
    close = difflib.get_close_matches(name, [*prepared, *tfds.list_builders()], n=1, cutoff=0.6)
    hint = (f" Did you mean {close[0]!r}? Prepare that with: {_how_to_prepare(close[0], data_dir)}." if close
            else " Check the spelling (`tfds.list_builders()` lists TFDS's data sets).")
    return (f"TFDS data set {name!r} is not prepared in {where}, and TFDS has no data set of that name.{hint} "
            f"A folder of your own images becomes a data set with `python -m mim_jax.data.prepare_folder "
            f"--src=DIR --name={name}`.")


class DataMismatchError(UserFacingError, ValueError):
    pass


class DataNotFoundError(UserFacingError, FileNotFoundError):
    pass


class CorruptDataError(UserFacingError, OSError):
    pass


def open_source(name: str, split: str, data_dir: str | None = None, *, channels: int | None = None):
    """A random-access TFDS source (array_record). Never downloads: a data set that is missing,
    or prepared only as tfrecord, is a FileNotFoundError that says how to prepare it. `channels`:
    the config's `input.channels`, checked against the data set's images. A record that cannot be
    read raises CorruptDataError naming its file and how to prepare the data set again."""
    import tensorflow_datasets as tfds
    where = data_dir or tfds.core.constants.DATA_DIR
    try:
        builder = tfds.builder(name, data_dir=data_dir)  # reads metadata only
    except tfds.core.DatasetNotFoundError:   # its message lists every TFDS data set (~460 lines)
        raise DataNotFoundError(_unknown_dataset(name, data_dir, where)) from None
    if not builder.is_prepared():
        raise DataNotFoundError(f"TFDS data set {name!r} is not prepared in {where}. Prepare it with: "
                                f"{_how_to_prepare(name, data_dir)}")
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" not in formats:  # tfds.data_source would fall back to nothing useful
        raise DataNotFoundError(
            f"TFDS data set {name!r} is prepared in {builder.data_dir} as {sorted(formats)}, but Grain "
            f"needs array_record. Convert it with `tfds convert_format --dataset_version_dir="
            f"{builder.data_dir} --out_file_format=array_record` (needs apache-beam), or delete it and "
            f"prepare again: {_how_to_prepare(name, data_dir)}")
    # Images stay encoded: the transforms decode them, at reduced scale where a crop allows
    # (data/decode.py).
    image_features = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]
    stored = builder.info.features["image"].shape[-1] if "image" in image_features else None
    if channels is not None and stored is not None and stored != channels:
        mean_std = "one mean and one std value" if stored == 1 else f"{stored} mean and {stored} std values"
        raise DataMismatchError(
            f"TFDS data set {name!r} has {stored}-channel images, but config.input.channels={channels}. Set "
            f"--config.input.channels={stored} with {mean_std} (config.input.mean/std), or use a "
            f"{channels}-channel data set.")
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                              decoders={k: tfds.decode.SkipDecoding() for k in image_features})
    return CheckedSource(source, name=name, split=split,
                         files=[f.filename for f in source.dataset_info.splits[split].file_instructions],
                         counts=[f.take for f in source.dataset_info.splits[split].file_instructions],
                         how_to_prepare=f"delete {builder.data_dir} and prepare it again: "
                                        f"{_how_to_prepare(name, data_dir)}")


class CheckedSource:
    """A TFDS source whose unreadable records name their file and the fix (array_record's own
    error names a chunk offset only). Picklable: it travels to the Grain workers."""

    def __init__(self, source, *, name: str, split: str, files: list[str], counts: list[int], how_to_prepare: str):
        self.source, self.name, self.split = source, name, split
        self.files, self.counts, self.how_to_prepare = files, counts, how_to_prepare

    def __len__(self):
        return len(self.source)

    def __getattr__(self, attribute):          # dataset_info, ... of the TFDS source
        if attribute == "source" or attribute.startswith("__"):   # unpickling: not set yet
            raise AttributeError(attribute)
        return getattr(self.source, attribute)

    def _file_of(self, index: int) -> str:
        ends = np.cumsum(self.counts)
        return self.files[min(int(np.searchsorted(ends, index, side="right")), len(self.files) - 1)]

    def __getitem__(self, index):
        try:
            return self.source[index]
        except Exception as error:     # noqa: BLE001 (array_record raises plain RuntimeErrors)
            if not _is_corruption(error):
                raise
            text = str(error)
            first = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
            raise CorruptDataError(
                f"Record {index} of TFDS data set {self.name!r} (split {self.split!r}) cannot be read: "
                f"{self._file_of(int(index))} is damaged ({first}). A partial copy or a disk error does "
                f"this; {self.how_to_prepare}") from None

    def __getitems__(self, indices):   # Grain's batched read; also what TFDS sources offer
        indices = list(indices)
        try:
            return self.source.__getitems__(indices)
        except Exception as error:     # noqa: BLE001 -- read one by one to name the damaged record
            if not _is_corruption(error):
                raise
            return [self[index] for index in indices]


def _is_corruption(error: Exception) -> bool:
    return any(sign in str(error).lower() for sign in ("riegeli", "corrupt", "data_loss", "checksum"))


class SyntheticSource:
    """Random images in the TFDS record format. FOR UNIT TESTS ONLY."""

    def __init__(self, num_examples: int, image_shape=(32, 32, 3), num_classes: int = 10, seed: int = 0):
        self.num_examples, self.image_shape, self.num_classes, self.seed = num_examples, image_shape, num_classes, seed

    def __len__(self):
        return self.num_examples

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, int(index)])  # a function of the index: random access
        return {"image": rng.integers(0, 256, self.image_shape, dtype=np.uint8),
                "label": int(rng.integers(self.num_classes))}


# Transforms are classes, not closures, so they pickle into Grain worker processes.
class PretrainTransform:
    """record, rng -> {'image': uint8 HWC, 'label': int32}: [colour jitter,] random-resized crop,
    flip. The train step normalises uint8 images on the device (`state.normalize_images`):
    a quarter of the bytes to copy between processes and to the device."""

    def __init__(self, image_size, crop_scale, crop_ratio, flip, mean, std, color_jitter=0.0,
                 interpolation="auto", max_reduction=8):
        self.image_size, self.crop_scale, self.crop_ratio = image_size, crop_scale, crop_ratio
        self.flip, self.mean, self.std = flip, mean, std
        self.color_jitter, self.interpolation = color_jitter, interpolation
        self.max_reduction = max_reduction   # libjpeg scale reduction allowed by the crop (1: off)

    def crop_and_flip(self, record, rng):
        image, channels = record["image"], len(self.mean)
        if self.color_jitter:  # BEiT/CAE jitter the whole image first (contrast uses its mean)
            image = transforms.color_jitter(decode.image(image, channels), rng, *(self.color_jitter,) * 3)
        image = transforms.random_resized_crop_encoded(image, rng, self.image_size, channels, self.crop_scale,
                                                       self.crop_ratio, self.interpolation, self.max_reduction)
        return transforms.horizontal_flip(image, rng) if self.flip else image

    def __call__(self, record, rng):
        return {"image": np.ascontiguousarray(self.crop_and_flip(record, rng)), "label": np.int32(record["label"])}


class EvalTransform:
    """Deterministic view: centre crop + resize + normalise."""

    def __init__(self, image_size, mean, std, crop_fraction=1.0):
        self.image_size, self.mean, self.std, self.crop_fraction = image_size, mean, std, crop_fraction

    def __call__(self, record, rng):
        del rng
        image = transforms.center_crop_resize(decode.image(record["image"], len(self.mean)), self.image_size,
                                              self.crop_fraction)
        return {"image": transforms.normalize(image, self.mean, self.std), "label": np.int32(record["label"])}


class DenseTransform:
    """Deterministic view of an image with a per-pixel label (the segmentation probe): the image
    resized to resolution x resolution bicubic and normalised, its label map resized nearest
    (`label`, [resolution, resolution] int32)."""

    def __init__(self, *, resolution, mean, std, image_key="image", mask_key="segmentation"):
        self.resolution, self.mean, self.std = resolution, mean, std
        self.image_key, self.mask_key = image_key, mask_key

    def __call__(self, record, rng):
        del rng
        image = transforms.resize(decode.image(record[self.image_key], len(self.mean)), self.resolution, "bicubic")
        mask = decode.label_map(record[self.mask_key])[..., None]
        mask = transforms.resize(mask, self.resolution, "nearest")[..., 0]
        return {"image": transforms.normalize(image, self.mean, self.std), "label": mask.astype(np.int32)}


class _LoadLocal:
    """Local element i of process p -> the transformed example at its global stream position."""

    def __init__(self, source, order, transform, seed, local_batch, global_batch, process_index, num_real=None):
        self.source, self.order, self.transform, self.seed = source, order, transform, seed
        self.b, self.B, self.p, self.num_real = local_batch, global_batch, process_index, num_real

    def __call__(self, i):
        position = (i // self.b) * self.B + self.p * self.b + i % self.b
        real = self.num_real is None or position < self.num_real
        index = int(self.order[position]) if real else 0  # padding repeats example 0
        record = dict(self.source[index], **{SOURCE_INDEX: index})
        out = self.transform(record, np.random.default_rng([self.seed, position]))
        out["index"] = np.int32(position % INT32_MAX)
        if self.num_real is not None:
            out["_mask"] = np.bool_(real)
        return out


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"Global batch {global_batch_size} is not divisible by {process_count} processes.")
    return global_batch_size // process_count


def _iterate(dataset, local_batch, num_workers, prefetch_buffer):
    # Batching inside the MapDataset makes a whole batch the unit of work: reader threads (and
    # worker processes with mp_prefetch) each build complete batches in parallel.
    dataset = dataset.batch(local_batch, drop_remainder=True)
    threads = 2 if num_workers else 4
    iterator = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                         prefetch_buffer_size=max(prefetch_buffer, threads)))
    if num_workers:
        iterator = iterator.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                                        worker_init_fn=_WorkerSetup(os.getpid()))
    return iter(iterator)


class _WorkerSetup:
    """Runs in each Grain worker.

    - The worker exits within a second of the trainer's death. A SIGKILLed trainer cannot stop its
      workers, and they (and multiprocessing's resource tracker, which waits for them) would
      otherwise run on for minutes with parent 1.
    - SIGTERM and SIGINT are the trainer's to act on. A scheduler's preemption notice (SLURM,
      Kubernetes, `kill -TERM -PGID`) or a terminal's Ctrl-C reaches the whole process group; a
      worker killed by it leaves the batches it had made in shared memory (reported as leaked at
      exit). Ignoring them, the workers live until the trainer closes its stream after its last
      save: Grain then stops them with an event (SIGKILL after a timeout) and unlinks their batches.
    """

    def __init__(self, parent_pid: int, poll_s: float = 0.5):
        self.parent_pid, self.poll_s = parent_pid, poll_s

    def __call__(self, worker_index: int, worker_count: int):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

        def watch():
            while _alive(self.parent_pid):
                time.sleep(self.poll_s)
            os._exit(1)
        threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _alive(pid: int) -> bool:
    if os.getppid() == 1:          # re-parented: the trainer is gone (and its pid may be reused)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _StepIterator(grain.DatasetIterator):
    """The training stream as a Grain iterator whose checkpoint state is the next global step.

    Grain's own states count elements of the pipeline they came from, so a state saved by a stream
    built at start_step=k would be misread by one built at step 0 (and mp_prefetch states depend
    on the worker count). {'next_step': s} means the same for any start, process count or worker
    count; set_state rebuilds the pipeline at s, which is free because the dataset is random access.
    """

    def __init__(self, build: Callable[[int], grain.DatasetIterator], start_step: int):
        super().__init__()
        self._build, self._next_step, self._iterator = build, start_step, None

    def _current(self):
        if self._iterator is None:
            self._iterator = self._build(self._next_step)
        return self._iterator

    def __next__(self):
        self._assert_not_closed()
        batch = next(self._current())
        self._next_step += 1
        return batch

    def get_state(self):
        return {"next_step": self._next_step}

    def set_state(self, state):
        if "next_step" not in state:  # e.g. a checkpoint from an older pipeline
            raise ValueError(f"Data iterator state {state} was not written by train_iterator (no 'next_step').")
        self._drop()
        self._next_step = int(state["next_step"])

    def start_prefetch(self):  # grain.checkpoint.CheckpointRestore calls this after set_state
        self._current().start_prefetch()

    def _drop(self):
        if self._iterator is not None:
            self._iterator.close()  # stops worker processes now rather than at garbage collection
            self._iterator = None

    def close(self):
        self._drop()
        super().close()


def release_shared_memory():
    """Unlinks the worker batches still in shared memory (the last ones trained on, those
    prefetched and dropped) now rather than at interpreter exit, where multiprocessing's resource
    tracker would report them as leaked. Call it once the training loop has returned: its batches
    are collected here, and Grain unlinks them on its one deletion thread, drained by a no-op
    queued after them."""
    import gc

    from grain.python import SharedMemoryArray
    gc.collect()
    deleter = getattr(SharedMemoryArray, "_del_thread_pool", None)   # None: deletions are synchronous
    if deleter is not None:
        deleter.apply_async(lambda: None).wait(timeout=10)


def train_iterator(source, *, global_batch_size: int, seed: int, process_index: int, process_count: int,
                   transform: Callable, start_step: int = 0, num_workers: int = 0, prefetch_buffer: int = 2):
    """Infinite iterator of this process's batches {'image', 'label', 'index'} of the global stream.

    b = global_batch_size // process_count examples per batch. `index` is the global stream
    position (epoch * len(source) + offset) modulo 2**31 - 1, so it fits int32 and is unique for
    the first 2**31 - 1 examples of training; `transform(record, rng)` gets
    rng = np.random.default_rng([seed, position]) (seed must be >= 0). The stream starts at global
    batch `start_step`; get_state/set_state (also via grain.checkpoint) save and restore the next
    global batch number, valid for any process count, worker count or start_step.
    """
    b = _local_batch(global_batch_size, process_count)
    # Reshuffled every epoch: repeat() asks the shuffle for positions past its length, and the
    # shuffle draws a new permutation for each epoch from the seed.
    order = grain.MapDataset.range(len(source)).shuffle(seed=seed % 2**32).repeat()
    load = _LoadLocal(source, order, transform, seed, b, global_batch_size, process_index)

    def build(step):  # local element i of the dataset is the i-th example this process reads
        local = grain.MapDataset.range(step * b, sys.maxsize).map(load)
        return _iterate(local, b, num_workers, prefetch_buffer)

    return _StepIterator(build, start_step)


def eval_iterator(source, *, global_batch_size: int, process_index: int, process_count: int,
                  transform: Callable, num_workers: int = 0, prefetch_buffer: int = 2):
    """One ordered pass; the last global batch is padded and padding has `_mask` False, so every
    process runs the same number of steps (uneven counts would hang collectives)."""
    b = _local_batch(global_batch_size, process_count)
    steps = -(-len(source) // global_batch_size)
    order = grain.MapDataset.range(len(source))
    load = _LoadLocal(source, order, transform, 0, b, global_batch_size, process_index, num_real=len(source))
    return _iterate(grain.MapDataset.range(steps * b).map(load), b, num_workers, prefetch_buffer)


def to_global_batch(local_batch, mesh, batch_axes=("data", "fsdp")):
    """This process's numpy batch -> global jax.Arrays with the leading axis sharded over
    `batch_axes` (those the mesh has). Runs in the main process only (imports jax)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    if not axes:  # replicating would silently treat each process's batch as the whole batch
        raise ValueError(f"Mesh axes {mesh.axis_names} include none of the batch axes {batch_axes}.")
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
