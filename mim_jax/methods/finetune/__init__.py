"""Supervised fine-tuning of a pre-trained encoder, run by the same trainer: `method.py`, and
`augment.py` (its host transform: RandAugment and random erasing, run in the Grain workers)."""
