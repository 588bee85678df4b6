"""Checkpoint key tables: every official layout maps onto the native modules of `ldm_inpaint.models`.

One file per model (`unet.py`, `vae.py`, `clip.py`) builds, from the same config that builds the model, the
complete `{native key: checkpoint key}` table for each layout; `common.py` reads checkpoint files and loads a
table strictly (every native tensor filled exactly once, every checkpoint tensor used or explicitly ignored).
"""

# The key tables import `ldm_inpaint.models`, and `ldm_inpaint` imports its loader, which imports the key tables.
# Importing that package first makes the cycle always start from its end, whichever module of this package a
# program imports first (otherwise `import weights_convert.clip` alone fails on a half-initialized module).
import ldm_inpaint  # noqa: E402, F401
