"""Training pictures from a folder: captions, square crops, flips, caption dropout and inpainting masks.

A folder holds images (png, jpg, jpeg, webp, bmp; subfolders too) and their captions, in either convention:
- kohya / A1111: `cat.png` beside `cat.txt`;
- Hugging Face imagefolder: `metadata.jsonl` at the root, one `{"file_name": "sub/cat.png", "text": "…"}` a line.
A metadata.jsonl entry wins over a .txt file; an image with neither trains with the empty caption.
Inpainting masks, when given, lie in `masks/` under the root with the image's relative path and a .png suffix
(`masks/cat.png`, `masks/sub/cat.png`), white = repaint; a mask of another size is stretched to its image's.
Names starting with "." (macOS `._cat.jpg` sidecars) are not images.

Every random choice for item i in epoch e — crop, flip, caption dropout, random mask — comes from one
generator seeded by (seed, e, i) (`item_generator`), so any process or DataLoader worker that asks for an item
gets the same tensors: a resumed run or a data-parallel rank sees exactly the data it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..checks import InputError, number
from .masks import random_mask

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASKS_FOLDER = "masks"
METADATA = "metadata.jsonl"
MASK_MODES = (None, "random", "data")
# What PIL raises for a file it cannot read: missing or not an image (OSError), truncated or a broken header
# (OSError, SyntaxError, ValueError), over twice PIL's pixel limit (DecompressionBombError).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator for every random choice of item `index` in `epoch`: a stable 64-bit hash of the three
    (blake2b; Python's hash() of strings changes between processes), so nearby seeds give unrelated streams."""
    digest = hashlib.blake2b(f"{seed},{epoch},{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class ImageFolder(torch.utils.data.Dataset):
    """Items are dicts: pixels (3, R, R) float32 in [-1, 1], caption (str, "" with probability
    caption_dropout), mask (1, R, R) float32 of 0/1 (1 = repaint; absent when masks is None) and index.

    masks: None (text-to-image training), "random" (masks.random_mask for every item) or "data" (the folder's
    masks/, a random one for an image without). Unreadable images are skipped with a warning each and counted
    in `skipped`. Call `set_epoch(e)` before each epoch (with DataLoader(persistent_workers=True) the workers
    keep their copy's epoch, so leave that off).
    """

    def __init__(self, root, resolution: int = 512, center_crop: bool = True, random_flip: bool = False,
                 caption_dropout: float = 0.0, masks: str | None = None, seed: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"training data folder not found: {root}; give a folder of images")
        self.resolution = number(resolution, "resolution", integer=True, low=8)
        if self.resolution % 8:
            raise InputError(f"resolution must be a multiple of 8 (the VAE's scale), got {self.resolution}")
        self.caption_dropout = number(caption_dropout, "caption_dropout", low=0, high=1)
        if masks not in MASK_MODES:
            raise InputError(f"masks must be None, 'random' or 'data', got {masks!r}")
        self.masks = masks
        self.center_crop, self.random_flip = bool(center_crop), bool(random_flip)
        self.seed = number(seed, "seed", integer=True)
        self.epoch = 0
        self._broken: set[int] = set()  # items found unreadable during the run

        found = self._find_images()
        self.files: list[Path] = [p for p in found if _readable(p)]
        self.skipped = len(found) - len(self.files)
        if not self.files:
            what = f"none of the {len(found)} image files could be read" if found else "no image files"
            raise InputError(f"{what} in {root} (looked for {', '.join(IMAGE_SUFFIXES)}, subfolders too); "
                             "give a folder of pictures")
        self.captions = self._read_captions()
        self.mask_files = self._find_masks() if masks == "data" else [None] * len(self.files)

    # -- the scan -----------------------------------------------------------------------------------------------
    def _find_images(self) -> list[Path]:
        masks = self.root / MASKS_FOLDER
        return sorted(p for p in self.root.rglob("*")
                      if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
                      and masks not in p.parents)

    def _read_captions(self) -> list[str]:
        by_name = self._read_metadata()
        captions, missing = [], 0
        for path in self.files:
            name = path.relative_to(self.root).as_posix()
            text_file = path.with_suffix(".txt")
            if name in by_name:
                captions.append(by_name[name])
            elif text_file.is_file():
                captions.append(text_file.read_text(encoding="utf-8", errors="replace").strip())
            else:
                captions.append("")
                missing += 1
        if missing:
            warn(f"{missing} of {len(self.files)} images in {self.root} have no caption (no .txt beside them, "
                 f"no {METADATA} entry); they train with the empty caption")
        return captions

    def _read_metadata(self) -> dict[str, str]:
        """{relative posix path: text} from metadata.jsonl, or {} without one."""
        path = self.root / METADATA
        if not path.is_file():
            return {}
        by_name = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                by_name[Path(entry["file_name"]).as_posix()] = str(entry["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputError(f"{path} line {n} is not a JSON object with file_name and text ({e!r}); "
                                 'write one {"file_name": "cat.png", "text": "a cat"} a line') from e
        names = {p.relative_to(self.root).as_posix() for p in self.files}
        unused = len(by_name.keys() - names)
        if unused:
            warn(f"{unused} {METADATA} entries name no readable image in {self.root}")
        return by_name

    def _find_masks(self) -> list[Path | None]:
        files = []
        for path in self.files:
            mask = (self.root / MASKS_FOLDER / path.relative_to(self.root)).with_suffix(".png")
            files.append(mask if mask.is_file() and _readable(mask) else None)
        missing = files.count(None)
        if missing:
            warn(f"{missing} of {len(files)} images in {self.root} have no readable mask in {MASKS_FOLDER}/ "
                 "(same name, .png); they get random masks")
        return files

    # -- items --------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = number(epoch, "epoch", integer=True, low=0)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.files):
            raise IndexError(f"item {index} of {len(self.files)}")
        # A file that turned unreadable since the scan (deleted, rewritten) must not end a long run: deliver the
        # next readable one instead, with this item's random choices, so it is no exact copy of that one's.
        for k in range(len(self.files)):
            j = (index + k) % len(self.files)
            if j in self._broken:
                continue
            try:
                image = _open(self.files[j]).convert("RGB")
                mask = _open(self.mask_files[j]).convert("L") if self.mask_files[j] else None
            except UNREADABLE as e:
                self._broken.add(j)
                warn(f"cannot read {self.files[j]} any more ({e}); using the next image instead")
                continue
            return self._item(image, mask, self.captions[j], index)
        raise InputError(f"no image in {self.root} is readable any more")

    def _item(self, image: Image.Image, mask: Image.Image | None, caption: str, index: int) -> dict:
        g = item_generator(self.seed, self.epoch, index)
        # Four draws always, in this order, so turning one option on does not change the others' choices.
        crop_x, crop_y, flip, drop = torch.rand(4, generator=g).tolist()
        R = self.resolution
        image, mask = resize_crop(image, mask, R, None if self.center_crop else (crop_x, crop_y))
        if self.random_flip and flip < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
        item = dict(pixels=to_pixels(image), caption="" if drop < self.caption_dropout else caption, index=index)
        if self.masks is not None:
            item["mask"] = to_mask(mask) if mask is not None else random_mask(R, R, g)
        return item


def collate(items: list[dict]) -> dict:
    """A batch: pixels (B, 3, R, R), captions list[str], masks (B, 1, R, R) or None, indices (B,) int64."""
    return dict(pixels=torch.stack([item["pixels"] for item in items]),
                captions=[item["caption"] for item in items],
                masks=torch.stack([item["mask"] for item in items]) if "mask" in items[0] else None,
                indices=torch.tensor([item["index"] for item in items], dtype=torch.long))


# -- pictures ---------------------------------------------------------------------------------------------------
def _readable(path: Path) -> bool:
    """Whether PIL can read the file's header and structure (verify() decodes no pixels); warns if not."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except UNREADABLE as e:
        warn(f"skipping {path}: not a readable image ({e})")
        return False


def _open(path: Path) -> Image.Image:
    """The picture, decoded and turned upright by its EXIF orientation (as a phone shows it)."""
    with Image.open(path) as im:
        im.load()
        return ImageOps.exif_transpose(im)


def resize_crop(image: Image.Image, mask: Image.Image | None, resolution: int,
                crop: tuple[float, float] | None) -> tuple[Image.Image, Image.Image | None]:
    """The shorter side resized to `resolution` (Lanczos), then a resolution² square cut out: in the centre
    (crop None) or at fractions crop = (x, y) in [0, 1) of the free range. The mask goes through the same steps
    (from its own size, so a half-size mask lands on the same pixels)."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    if mask is not None and mask.size != size:
        mask = mask.resize(size, Image.Resampling.LANCZOS)
    free_x, free_y = size[0] - resolution, size[1] - resolution
    if crop is None:
        left, top = free_x // 2, free_y // 2
    else:
        left, top = int(crop[0] * (free_x + 1)), int(crop[1] * (free_y + 1))
    box = (left, top, left + resolution, top + resolution)
    return image.crop(box), (mask.crop(box) if mask is not None else None)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB picture as (3, H, W) float32 in [-1, 1]."""
    a = np.asarray(image, dtype=np.float32) / 127.5 - 1  # (H, W, 3)
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def to_mask(mask: Image.Image) -> torch.Tensor:
    """A gray picture as a (1, H, W) float32 mask, binarised at 0.5 as the pipeline does (white = repaint)."""
    return torch.from_numpy(np.asarray(mask) >= 128).float()[None]
