"""Helpers shared by the openclipart data tools (retrieval captions, SDXL style sets).

Debian's ``openclipart-png`` package installs public-domain clip art under :data:`CLIPART_ROOT`.
"""
from __future__ import annotations

from PIL import Image

__all__ = ['CLIPART_ROOT', 'to_square_rgb']

CLIPART_ROOT = '/usr/share/openclipart/png'


def to_square_rgb(image: Image.Image, resolution: int) -> Image.Image:
    """Composite on white, pad to a centred white square and resize to ``resolution``×``resolution``.

    Clip art is transparent and of any aspect ratio; padding (not cropping) keeps the whole drawing.
    """
    rgba = image.convert('RGBA')
    flat = Image.new('RGB', rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel('A'))
    side = max(flat.size)
    square = Image.new('RGB', (side, side), (255, 255, 255))
    square.paste(flat, ((side - flat.width) // 2, (side - flat.height) // 2))
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS)
