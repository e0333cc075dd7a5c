"""Supervised fine-tuning of a pre-trained encoder, run by the same trainer: `method.py`."""
