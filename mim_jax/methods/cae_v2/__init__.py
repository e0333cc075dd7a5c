"""CAE v2: `method.py` (the Method, with its frozen CLIP teacher as a component) and
`regressor.py` (the latent regressor's Linen modules)."""
