"""CAE v2: `method.py` (the Method, with its frozen teacher as a component), `teachers.py` (the
teachers: CLIP, or the encoder of a run or weight file) and `regressor.py` (the latent regressor's
Linen modules)."""
