"""What the library knows about common TFDS data sets (the rest needs config overrides)."""
import dataclasses

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Known data sets: (split, channels, mean, std). Any other TFDS image data set works with
# dataset=NAME: then channels/mean/std default to RGB ImageNet statistics (override as needed).
DATASETS = {
    "imagenet2012": ("train", 3, IMAGENET_MEAN, IMAGENET_STD),
    "fashion_mnist": ("train", 1, (0.2860,), (0.3530,)),
    "mnist": ("train", 1, (0.1307,), (0.3081,)),
    "cifar10": ("train", 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "fashion_mnist_mosaic": ("train", 1, (0.2860,), (0.3530,)),   # the items' statistics
}
# Held-out split used by evaluators (TFDS names).
EVAL_SPLITS = {"imagenet2012": "validation", "scene_parse150": "test", "cityscapes": "validation"}
# Training-split sizes, for what is sized by the data set before any is read (per-example state in
# an ahead-of-time compile).
TRAIN_EXAMPLES = {"imagenet2012": 1_281_167, "fashion_mnist": 60_000, "mnist": 60_000, "cifar10": 50_000}
NUM_CLASSES = {"imagenet2012": 1000, "fashion_mnist": 10, "mnist": 10, "cifar10": 10}


@dataclasses.dataclass(frozen=True)
class DenseData:
    """A data set with a per-pixel label: the feature holding it, the labels no pixel is scored on,
    the class count (labels 0 .. num_classes - 1, ignored ones included) and the resolution the
    segmentation probe resizes to by default."""
    image_key: str
    mask_key: str
    ignore_labels: tuple
    num_classes: int
    resolution: int = 224


# Known dense data sets (TFDS names, plus the embedded `fashion_mnist_mosaic`). ADE20K ignores 0
# ("other") and 255 as CAPI's protocol; Oxford pets' trimaps are 1 pet, 2 background, 3 border
# (ignored); Cityscapes' labels are its label ids, 0 (unlabeled) ignored.
DENSE = {
    "scene_parse150": DenseData(image_key="image", mask_key="annotation", ignore_labels=(0, 255), num_classes=151),
    "cityscapes": DenseData(image_key="image_left", mask_key="segmentation_label", ignore_labels=(0, 255),
                            num_classes=34),
    "oxford_iiit_pet": DenseData(image_key="image", mask_key="segmentation_mask", ignore_labels=(0, 3),
                                 num_classes=4),
    "fashion_mnist_mosaic": DenseData(image_key="image", mask_key="segmentation", ignore_labels=(),
                                      num_classes=11, resolution=56),
}
# The dense task an encoder pre-trained on a data set is probed on by default.
DENSE_TASK = {"fashion_mnist": "fashion_mnist_mosaic", "imagenet2012": "scene_parse150"}
