"""Weights from and to other codebases: PyTorch state dicts of timm, the official MAE, CAE v2,
CAPI and Beyond Masking code, Hugging Face folders and OpenAI's CLIP files. A low layer: it knows
the Linen models' parameter trees, never the methods."""
