"""The training data side: image folders (captions, masks, unreadable files, crops and flips, determinism,
caption dropout), random inpainting masks, and the procedural shapes data set of the demo model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_inpaint.checks import InputError
from ldm_inpaint.train import masks as masks_module
from ldm_inpaint.train import shapes
from ldm_inpaint.train.data import ImageFolder, collate
from ldm_inpaint.train.masks import random_mask


def _png(path, size=(16, 16), colour=(200, 40, 40), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


# -- captions ---------------------------------------------------------------------------------------------------
def test_captions_from_txt_files_and_missing_ones_counted(tmp_path, capsys):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red square\n", encoding="utf-8")
    _png(tmp_path / "b.JPG", mode="L", colour=90)  # upper-case suffix, gray: read as RGB
    _png(tmp_path / "c.webp")
    data = ImageFolder(tmp_path, resolution=8)
    assert [p.name for p in data.files] == ["a.png", "b.JPG", "c.webp"]
    assert data.captions == ["a red square", "", ""]
    assert data[1]["pixels"].shape == (3, 8, 8) and "mask" not in data[1]
    [line] = _warnings(capsys)
    assert "2 of 3 images" in line and "no caption" in line


def test_captions_from_metadata_jsonl_with_subfolders(tmp_path, capsys):
    _png(tmp_path / "sub" / "deep" / "cat.png")
    _png(tmp_path / "dog.png")
    (tmp_path / "dog.txt").write_text("from the txt file")
    lines = [{"file_name": "sub/deep/cat.png", "text": "a cat"}, {"file_name": "dog.png", "text": "a dog"},
             {"file_name": "gone.png", "text": "no such file"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = ImageFolder(tmp_path, resolution=8)
    assert dict(zip((p.relative_to(tmp_path).as_posix() for p in data.files), data.captions)) == \
        {"sub/deep/cat.png": "a cat", "dog.png": "a dog"}  # metadata wins over the .txt
    [line] = _warnings(capsys)
    assert "1 metadata.jsonl entries name no readable image" in line


def test_bad_metadata_line_is_an_input_error(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "a.png"}\n')
    with pytest.raises(InputError, match="line 2"):
        ImageFolder(tmp_path, resolution=8)


# -- masks from the folder ----------------------------------------------------------------------------------------
def test_masks_from_masks_folder_and_random_for_the_rest(tmp_path, capsys):
    _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "b.jpg")
    _png(tmp_path / "c.png")
    left = Image.new("L", (16, 16), 0)
    left.paste(255, (0, 0, 8, 16))
    (tmp_path / "masks" / "sub").mkdir(parents=True)
    left.save(tmp_path / "masks" / "a.png")
    left.resize((8, 8)).save(tmp_path / "masks" / "sub" / "b.png")  # half size: stretched to its image
    data = ImageFolder(tmp_path, resolution=16, masks="data")
    assert len(data) == 3  # masks/ holds no training images
    expected = torch.zeros(1, 16, 16)
    expected[..., :8] = 1
    assert torch.equal(data[0]["mask"], expected) and torch.equal(data[2]["mask"], expected)
    random = data[1]["mask"]
    assert random.shape == (1, 16, 16) and random.sum() > 0 and set(random.unique().tolist()) <= {0.0, 1.0}
    assert any("1 of 3 images" in line and "random masks" in line for line in _warnings(capsys))
    assert "mask" not in ImageFolder(tmp_path, resolution=16)[0]
    assert ImageFolder(tmp_path, resolution=16, masks="random")[0]["mask"].shape == (1, 16, 16)


# -- unreadable and missing files --------------------------------------------------------------------------------
def test_unreadable_images_are_skipped_with_a_warning_each(tmp_path, capsys):
    _png(tmp_path / "good.png")
    (tmp_path / "garbage.png").write_bytes(b"not a picture at all")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "._good.png").write_bytes(b"\x00\x05\x16\x07 macOS sidecar")  # not an image: not even tried
    data = ImageFolder(tmp_path, resolution=8)
    assert [p.name for p in data.files] == ["good.png"] and data.skipped == 2
    skipped = [line for line in _warnings(capsys) if line.startswith("warning: skipping")]
    assert len(skipped) == 2 and any("garbage.png" in s for s in skipped)


def test_empty_or_unreadable_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no image files .*looked for .png"):
        ImageFolder(tmp_path)
    (tmp_path / "x.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="none of the 1 image files could be read"):
        ImageFolder(tmp_path)
    with pytest.raises(InputError, match="not found"):
        ImageFolder(tmp_path / "missing")


@pytest.mark.parametrize("kwargs, message", [(dict(resolution=100), "multiple of 8"),
                                             (dict(masks="boxes"), "masks must be"),
                                             (dict(caption_dropout=1.5), "caption_dropout"),
                                             (dict(seed="1"), "seed")])
def test_bad_arguments_are_input_errors(tmp_path, kwargs, message):
    _png(tmp_path / "a.png")
    with pytest.raises(InputError, match=message):
        ImageFolder(tmp_path, **kwargs)


def test_a_file_turning_unreadable_during_the_run_is_replaced_by_the_next(tmp_path, capsys):
    _png(tmp_path / "a.png", colour=(255, 0, 0))
    _png(tmp_path / "b.png", colour=(0, 0, 255))
    data = ImageFolder(tmp_path, resolution=8)
    capsys.readouterr()
    (tmp_path / "a.png").write_bytes(b"overwritten")
    for _ in range(2):
        item = data[0]
        assert item["index"] == 0 and item["pixels"][2].min() == 1  # b's blue
    [line] = _warnings(capsys)  # once, not at every request
    assert "a.png" in line
    (tmp_path / "b.png").unlink()
    with pytest.raises(InputError, match="readable any more"):
        data[1]


# -- geometry ----------------------------------------------------------------------------------------------------
def _asymmetric_folder(tmp_path):
    """A 96 × 64 picture: red = white left of x = 40, green = a left-to-right ramp; its mask = the white part."""
    a = np.zeros((64, 96, 3), np.uint8)
    a[:, :40, 0] = 255
    a[:, :, 1] = np.linspace(0, 255, 96).round().astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    (tmp_path / "masks").mkdir()
    Image.fromarray(a[:, :, 0]).save(tmp_path / "masks" / "a.png")


def test_resize_crop_and_flip_move_the_mask_with_the_image(tmp_path):
    _asymmetric_folder(tmp_path)
    data = ImageFolder(tmp_path, resolution=32, center_crop=False, random_flip=True, masks="data")
    starts, flips = set(), set()
    for epoch in range(12):
        data.set_epoch(epoch)
        item = data[0]
        pixels, mask = item["pixels"], item["mask"]
        assert pixels.shape == (3, 32, 32) and mask.shape == (1, 32, 32) and pixels.dtype == torch.float32
        assert -1 <= pixels.min() and pixels.max() <= 1
        red = ((pixels[0] + 1) * 127.5).round()
        assert torch.equal(mask[0], (red >= 128).float())  # the same resize, crop and flip as the image
        green = pixels[1, 0]
        flipped = bool(green[0] > green[-1])
        flips.add(flipped)
        starts.add(round(float(green[-1] if flipped else green[0]), 3))
    assert flips == {True, False} and len(starts) > 3
    centre = ImageFolder(tmp_path, resolution=32, masks="data")[0]
    green = ((centre["pixels"][1, 0] + 1) * 127.5).round()
    assert green[0] < green[-1] and abs(float(green[:16].mean() + green[16:].mean()) / 2 - 127.5) < 3  # centred


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((16, 64, 3), np.uint8)
    a[:, :32] = 255  # stored: white left, black right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": white ends on top
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95, exif=exif)
    pixels = ImageFolder(tmp_path, resolution=16)[0]["pixels"]
    assert pixels[:, :8].mean() > 0.8 and pixels[:, 8:].mean() < -0.8


# -- determinism and dropout ---------------------------------------------------------------------------------------
def test_items_are_a_function_of_seed_epoch_and_index(tmp_path):
    _asymmetric_folder(tmp_path)
    (tmp_path / "a.txt").write_text("a caption")

    def folder(seed=0):
        return ImageFolder(tmp_path, resolution=32, center_crop=False, random_flip=True, caption_dropout=0.5,
                           masks="random", seed=seed)

    one, two = folder(), folder()
    two.set_epoch(3)
    two.set_epoch(0)
    for key in ("pixels", "mask"):
        assert torch.equal(one[0][key], two[0][key])
    seen = []
    for epoch in range(8):
        one.set_epoch(epoch)
        item = one[0]
        seen.append((item["pixels"], item["mask"], item["caption"]))
    assert len({p.numpy().tobytes() for p, _, _ in seen}) > 4  # crops and flips change with the epoch
    assert len({m.numpy().tobytes() for _, m, _ in seen}) > 4
    assert {c for _, _, c in seen} == {"", "a caption"}
    assert not torch.equal(folder(seed=1)[0]["mask"], folder(seed=0)[0]["mask"])


def test_caption_dropout_rate(tmp_path):
    for name in "abcd":
        _png(tmp_path / f"{name}.png", size=(8, 8))
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")
    data = ImageFolder(tmp_path, resolution=8, caption_dropout=0.3)
    dropped = []
    for epoch in range(100):
        data.set_epoch(epoch)
        dropped += [data[i]["caption"] == "" for i in range(len(data))]
    assert abs(np.mean(dropped) - 0.3) < 0.07  # 400 draws: 3 standard deviations
    assert all(ImageFolder(tmp_path, resolution=8, caption_dropout=0)[i]["caption"] for i in range(4))
    assert not any(ImageFolder(tmp_path, resolution=8, caption_dropout=1)[i]["caption"] for i in range(4))


def test_collate(tmp_path):
    for name in "abc":
        _png(tmp_path / f"{name}.png")
    data = ImageFolder(tmp_path, resolution=8, masks="random")
    batch = collate([data[2], data[0]])
    assert batch["pixels"].shape == (2, 3, 8, 8) and batch["masks"].shape == (2, 1, 8, 8)
    assert batch["captions"] == ["", ""] and batch["indices"].tolist() == [2, 0]
    assert batch["indices"].dtype == torch.long
    assert collate([ImageFolder(tmp_path, resolution=8)[0]])["masks"] is None


def test_dataloader_workers_give_the_same_items(tmp_path):
    _asymmetric_folder(tmp_path)
    _png(tmp_path / "b.png", size=(40, 48))
    data = ImageFolder(tmp_path, resolution=32, center_crop=False, random_flip=True, masks="random", seed=4)
    data.set_epoch(2)
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=collate)
    [batch] = list(loader)
    here = collate([data[0], data[1]])
    assert torch.equal(batch["pixels"], here["pixels"]) and torch.equal(batch["masks"], here["masks"])


# -- random masks --------------------------------------------------------------------------------------------------
def test_random_masks_never_empty_and_a_quarter_full():
    full = 0
    for seed in range(400):
        m = random_mask(32, 48, torch.Generator().manual_seed(seed))
        assert m.shape == (1, 32, 48) and m.dtype == torch.float32
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert m.mean() >= masks_module.MIN_COVERAGE
        full += bool(m.min() == 1)
    assert abs(full / 400 - 0.25) < 0.07  # the SD 1.5 recipe's quarter; 3 standard deviations of 400 draws
    a, b = (random_mask(64, 64, torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a, b)


# -- the shapes data set ---------------------------------------------------------------------------------------------
CAPTION = re.compile(r"^a (\w+) (circle|square|triangle)(?: and a (\w+) (circle|square|triangle))? "
                     r"on a (\w+)(?: and (\w+))? background$")


def test_shape_captions_match_the_rendered_colours():
    two_tone = two_shapes = 0
    for seed in range(60):
        scene = shapes.random_scene(torch.Generator().manual_seed(seed))
        image = np.asarray(shapes.render(scene, 64))
        words = CAPTION.match(shapes.caption(scene)).groups()
        named = [(c, k) for c, k in (words[0:2], words[2:4]) if c]
        background = [c for c in words[4:] if c]
        assert len(named) == len(scene.shapes)
        for (colour, kind), shape in zip(named, scene.shapes):
            assert kind == shape.kind and colour not in background
            left, top, right, bottom = shape.box
            centre = image[int((top + bottom) / 2 * 64), int((left + right) / 2 * 64)]
            assert tuple(centre) == shapes.COLOURS[colour]
        if scene.split:  # the first colour at the top (left), the second at the bottom (right)
            a, b = ((16, 1), (48, 62)) if scene.split == "vertical" else ((1, 16), (62, 48))
            for (x, y), colour in zip((a, b), background):
                if not any(s.box[0] * 64 - 2 <= x <= s.box[2] * 64 + 2 and s.box[1] * 64 - 2 <= y <= s.box[3] * 64 + 2
                           for s in scene.shapes):
                    assert tuple(image[y, x]) == shapes.COLOURS[colour]
        two_tone += len(background) == 2
        two_shapes += len(named) == 2
    assert 5 < two_tone < 35 and 10 < two_shapes < 40


def test_random_scene_takes_numpy_generators_too():
    assert shapes.random_scene(np.random.default_rng(7)) == shapes.random_scene(np.random.default_rng(7))
    with pytest.raises(InputError, match="rng"):
        shapes.random_scene(7)


def test_shapes_dataset_items_masks_and_determinism():
    data = shapes.ShapesDataset(40, size=64, seed=3)
    item = data[5]
    assert item["pixels"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64) and item["index"] == 5
    assert torch.equal(shapes.ShapesDataset(40, size=64, seed=3)[5]["pixels"], item["pixels"])
    data.set_epoch(1)
    assert data[5]["caption"] != item["caption"] or not torch.equal(data[5]["pixels"], item["pixels"])
    boxes = 0
    for i in range(40):
        mask = data[i]["mask"][0]
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        bounding = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        boxes += bool(bounding.all())  # a rectangle: a shape's mask (or a full / one-box random one)
    assert boxes >= 12
    assert "mask" not in shapes.ShapesDataset(2, size=64, masks=None)[0]


def test_shape_mask_covers_the_box_and_a_margin():
    shape = shapes.Shape("circle", "red", (0.25, 0.5, 0.5, 0.75))
    mask = shapes.shape_mask(shape, 128)
    assert mask[0, 64 - 4:96 + 4, 32 - 4:64 + 4].all() and mask.sum() == 40 * 40


def test_write_folder_round_trip_through_image_folder(tmp_path):
    folder = shapes.write_folder(tmp_path / "shapes", 6, seed=2, size=64)
    assert sorted(p.name for p in (folder / "masks").iterdir()) == [f"{i:05d}.png" for i in range(6)]
    read = ImageFolder(folder, resolution=64, masks="data")
    made = shapes.ShapesDataset(6, size=64, seed=2)
    assert len(read) == 6
    for i in range(6):
        a, b = read[i], made[i]
        assert a["caption"] == b["caption"]
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["mask"], b["mask"])


def test_demo_inputs():
    image, mask = shapes.demo_inputs("blue")
    assert image.size == mask.size == (128, 128) and image.getpixel((0, 0)) == shapes.COLOURS["blue"]
    m = np.asarray(mask)
    assert (m == 255).sum() == 48 * 48 and m[40:88, 40:88].all()
    with pytest.raises(InputError, match="not one of"):
        shapes.demo_inputs("purple")
