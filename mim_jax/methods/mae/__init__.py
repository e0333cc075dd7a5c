"""MAE, the baseline: `method.py` (the Method). Its pixel decoder is shared (models/decoder.py);
Beyond Masking and CMAE extend this method."""
