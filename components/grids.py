"""Labelled image grids: one row per class (or per original/reconstruction), a caption on the left."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH = 150


def labeled_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], cell: int = 64, pad: int = 2) -> Image.Image:
    """Rows of images, each row headed by its label, on white; images are resized to ``cell``."""
    columns = max((len(images) for _, images in rows), default=0)
    width = LABEL_WIDTH + columns * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad
    grid = Image.new("RGB", (width, max(height, 1)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    for r, (label, images) in enumerate(rows):
        top = pad + r * (cell + pad)
        draw.text((4, top + cell // 2), _fit(draw, label, font), fill="black", font=font, anchor="lm")
        for c, image in enumerate(images):
            tile = image.convert("RGB")
            if tile.size != (cell, cell):
                tile = tile.resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (LABEL_WIDTH + pad + c * (cell + pad), top))
    return grid


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> str:
    while len(text) > 1 and draw.textlength(text, font=font) > LABEL_WIDTH - 8:
        text = text[:-2] + "…"
    return text
