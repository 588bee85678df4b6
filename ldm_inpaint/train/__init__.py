"""Training: LoRA and full fine-tuning of the pipeline's own models, and the recipe of the embedded demo model.

    data.py     image folders with captions (kohya .txt or metadata.jsonl), crops, flips, caption dropout, masks
    masks.py    random inpainting masks (strokes, boxes, fully masked), as in the SD inpainting recipe
    shapes.py   the procedural shapes data set the demo model is trained on
    loop.py     the training loop: loss, optimizer, schedule, EMA, checkpoints and resume, validation, DDP
    python -m ldm_inpaint.train --help
"""
