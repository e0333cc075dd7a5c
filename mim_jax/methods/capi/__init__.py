"""CAPI: `method.py` (the Method, its EMA teacher as a component), `heads.py` (the predictor and
clustering heads' Linen modules) and `sinkhorn.py` (positionwise Sinkhorn-Knopp)."""
