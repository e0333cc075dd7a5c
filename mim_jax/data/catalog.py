"""What the library knows about common TFDS data sets (the rest needs config overrides)."""

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Known data sets: (split, channels, mean, std). Any other TFDS image data set works with
# dataset=NAME: then channels/mean/std default to RGB ImageNet statistics (override as needed).
DATASETS = {
    "imagenet2012": ("train", 3, IMAGENET_MEAN, IMAGENET_STD),
    "fashion_mnist": ("train", 1, (0.2860,), (0.3530,)),
    "mnist": ("train", 1, (0.1307,), (0.3081,)),
    "cifar10": ("train", 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# Held-out split used by evaluators (TFDS names).
EVAL_SPLITS = {"imagenet2012": "validation"}
NUM_CLASSES = {"imagenet2012": 1000, "fashion_mnist": 10, "mnist": 10, "cifar10": 10}
