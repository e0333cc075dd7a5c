"""Weights from and to other codebases, and the one grammar that names weights.

A weights spec (`spec.parse`) is a run of this project (`run:DIR`, or a workdir), a file or folder
with an optional layout (`mae:/ckpt/mae_pretrain_vit_base.pth`, `/hub/model.safetensors`) or a
Hugging Face hub id (a CLIP teacher). Each layout of another codebase (timm and the official MAE,
CAE v2's BEiT, Beyond Masking's MAE-pytorch, Hugging Face ViT/MAE, CAPI, OpenAI CLIP) is one entry
of `registry.LAYOUTS` that detects its files, describes the encoder they hold, imports them into
params and exports params to it. A low layer: it knows the Linen models' parameter trees, never the
methods (a method is passed in and read by its attributes)."""
