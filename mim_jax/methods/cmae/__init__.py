"""CMAE: `method.py` (the Method; ContrastiveCrop's box refresh and host state as components),
`heads.py` (contrastive head, predictor, position head), `contrastive.py` (InfoNCE, position
loss, heat-map boxes), and the host side run in Grain workers: `contrastive_crop.py` (the crops)
and `views.py` (the two augmented views)."""
