"""Beyond Masking: `method.py` (the Method, MAE extended with the five degradations) and
`degradations.py` (its on-device resampling, per-patch per-channel targets, warps and blurs)."""
