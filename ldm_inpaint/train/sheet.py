"""Pictures of a training run, drawn with Pillow alone: contact sheets of validation samples and the loss curve."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from ..outputs import save_png

LABEL_HEIGHT = 14
INK, PAPER, GRID = (30, 30, 30), (255, 255, 255), (225, 225, 225)


def contact_sheet(rows: list[list[Image.Image]], labels: list[str], path: str | Path) -> None:
    """One PNG: a row of pictures per label (a validation prompt), the label written above its row."""
    w, h = rows[0][0].size
    columns = max(len(r) for r in rows)
    sheet = Image.new("RGB", (columns * w, len(rows) * (h + LABEL_HEIGHT)), PAPER)
    draw = ImageDraw.Draw(sheet)
    for i, (row, label) in enumerate(zip(rows, labels)):
        top = i * (h + LABEL_HEIGHT)
        draw.text((2, top + 1), label, fill=INK)
        for j, picture in enumerate(row):
            sheet.paste(picture.resize((w, h)), (j * w, top + LABEL_HEIGHT))
    save_png(sheet, path)


def line_plot(xs: list[float], ys: list[float], path: str | Path, title: str = "", xlabel: str = "",
              ylabel: str = "", size: tuple[int, int] = (640, 360)) -> None:
    """A line chart of ys over xs (raw in grey, a running mean over ~2 % of the points in black), on a
    log scale when ys span more than a decade (losses usually do)."""
    import math

    width, height = size
    left, right, top, bottom = 60, 16, 28, 36
    log = min(ys) > 0 and max(ys) / min(ys) > 10
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = f(min(ys)), f(max(ys))
    hi = hi if hi > lo else lo + 1
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def point(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                top + (hi - f(y)) / (hi - lo) * (height - top - bottom))

    image = Image.new("RGB", size, PAPER)
    draw = ImageDraw.Draw(image)
    for k in range(5):  # horizontal grid lines with their values
        v = lo + (hi - lo) * k / 4
        y = top + (hi - v) / (hi - lo) * (height - top - bottom)
        draw.line([(left, y), (width - right, y)], fill=GRID)
        draw.text((4, y - 6), f"{10 ** v if log else v:.3g}", fill=INK)
    draw.line([point(x, y) for x, y in zip(xs, ys)], fill=(170, 170, 170))
    window = max(1, len(ys) // 50)
    smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
    draw.line([point(x, y) for x, y in zip(xs, smooth)], fill=INK, width=2)
    draw.rectangle([left, top, width - right, height - bottom], outline=INK)
    draw.text((left, 8), title + (" (log scale)" if log else ""), fill=INK)
    draw.text((left, height - bottom + 6), f"{x0:g}", fill=INK)
    draw.text((width - right - 40, height - bottom + 6), f"{x1:g}", fill=INK)
    draw.text(((width - len(xlabel) * 6) // 2, height - 16), xlabel, fill=INK)
    if ylabel:
        draw.text((4, 8), ylabel, fill=INK)
    save_png(image, path)
