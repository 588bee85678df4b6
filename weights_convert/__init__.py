"""Checkpoint key tables: every official layout maps onto the native modules of `ldm_inpaint.models`.

One file per model (`unet.py`, `vae.py`, `clip.py`) builds, from the same config that builds the model, the
complete `{native key: checkpoint key}` table for each layout; `common.py` reads checkpoint files and loads a
table strictly (every native tensor filled exactly once, every checkpoint tensor used or explicitly ignored).
"""
