"""What an evaluator reads: which data set, which of its splits, through which host transform. By
default the centre views of the pre-training data (or `config.dataset`) at the encoder's input
size; an evaluator module that reads other data defines `view(config, inp, split_overrides)`
(the segmentation probe: a data set with per-pixel labels, at its resolution)."""
from __future__ import annotations

import dataclasses
from typing import Callable

from mim_jax.data import catalog, pipeline


@dataclasses.dataclass(frozen=True)
class View:
    dataset: str
    data_dir: str | None
    splits: dict                 # the evaluator's split ('train', 'eval') -> the TFDS split
    transform: Callable          # record, rng -> {'image', 'label'}
    num_classes: int | None = None   # None: the known data set's, else 1 + the largest label read
    ignore_labels: tuple = ()        # labels no pixel is scored on (dense data)

    def open(self, split: str, channels: int):
        return pipeline.open_source(self.dataset, self.splits[split], self.data_dir, channels=channels)

    def classes(self, feats) -> int:
        return self.num_classes or catalog.NUM_CLASSES.get(self.dataset) or int(feats["eval"][1].max() + 1)


def split_names(data_config, splits, *, train_split: str | None = None, eval_split: str | None = None) -> dict:
    """{'train': ..., 'eval': ...} TFDS split names of the splits an evaluator reads: by default the
    pre-training split and the data set's evaluation split (EVAL_SPLITS, else "test")."""
    names = {"train": train_split or data_config.split,
             "eval": eval_split or catalog.EVAL_SPLITS.get(data_config.dataset, "test")}
    return {split: names[split] for split in splits}


def image_view(evaluator, config, inp, split_overrides: dict | None = None) -> View:
    del config
    overrides = split_overrides or {}
    return View(dataset=inp.dataset, data_dir=inp.data_dir,
                splits=split_names(inp, evaluator.SPLITS, train_split=overrides.get("train"),
                                   eval_split=overrides.get("eval")),
                transform=pipeline.EvalTransform(inp.image_size, inp.mean, inp.std))


def of(evaluator, config, inp, split_overrides: dict | None = None) -> View:
    """The view `evaluator` (a module of this package) reads, for an encoder trained on `inp`."""
    if hasattr(evaluator, "view"):
        return evaluator.view(config, inp, split_overrides)
    return image_view(evaluator, config, inp, split_overrides)
