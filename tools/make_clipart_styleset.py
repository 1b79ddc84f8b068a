"""Make a small, real style data set from the Debian ``openclipart-png`` package (public-domain clip art).

One category folder (e.g. ``food/fruit``, 91 images) becomes an imagefolder with a ``metadata.jsonl`` of captions, the
layout ``datasets.load_dataset('imagefolder')`` and ``visadapt-train-sdxl`` read::

    <output_dir>/0000.png ... <output_dir>/metadata.jsonl   # {"file_name": "0000.png", "text": "..."} per line

Images are composited on white (clip art is transparent), fitted into a square with white padding and resized to
``--resolution``. Files whose header says they exceed ``--max_source_pixels`` (a few posters in the package are
over 100 megapixels) are skipped before decoding. Captions come from the titles: the PNG package has no title metadata, so the title is the file name
stem as the packager wrote it (title words, then the author's name, cut to 24 characters; the trailing ``_NN`` is
dropped), e.g. ``apple_green_jonathon_sim_01.png`` → ``"apple green jonathon sim"``. ``--caption_template`` puts a
style trigger around it.

Usage::

    python tools/make_clipart_styleset.py --category food/fruit --resolution 128 --output_dir data/clipart-fruit
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import warnings
from typing import List, Optional

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/ helpers
from clipart import CLIPART_ROOT, to_square_rgb  # noqa: E402

from visadapt.core.io import atomic_write_bytes  # noqa: E402


def title_from_filename(filename: str) -> str:
    """``'apple_green_jonathon_sim_01.png'`` → ``'apple green jonathon sim'``."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    stem = re.sub(r'_\d*$', '', stem)
    return re.sub(r'\s+', ' ', re.sub(r'[_\-]+', ' ', stem)).strip()


def make_styleset(category: str, output_dir: str, resolution: int = 128, max_images: Optional[int] = None,
                  caption_template: str = '{title}, clipart style', max_source_pixels: int = 40_000_000,
                  root: str = CLIPART_ROOT) -> List[dict]:
    """Write the data set; returns the metadata rows.

    Args:
        category: a folder under ``root``, e.g. ``'food/fruit'`` (only its own PNGs, not subfolders).
        output_dir: target folder (created; existing ``NNNN.png`` files with the same names are overwritten).
        resolution: side of the square output images, in pixels.
        max_images: keep only the first N files (sorted by name); None keeps all.
        caption_template: format string with a ``{title}`` field.
        max_source_pixels: skip source files larger than this (width × height, read from the header).
    """
    folder = os.path.join(root, category)
    if not os.path.isdir(folder):
        known = sorted(os.path.relpath(d, root) for d, _, fs in os.walk(root) if any(f.endswith('.png') for f in fs))
        raise ValueError(f'category {category!r} is not a folder under {root!r} (is openclipart-png installed?); '
                         f'categories include {known[:12]}')
    if resolution < 8:
        raise ValueError(f'resolution must be at least 8 pixels, got {resolution}')
    if '{title}' not in caption_template:
        raise ValueError(f'caption_template must contain {{title}}, got {caption_template!r}')
    files = []
    for name in sorted(f for f in os.listdir(folder) if f.lower().endswith('.png')):
        with warnings.catch_warnings():  # sizes are checked here; this is a trusted system package
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(os.path.join(folder, name)) as image:  # lazy: reads the header only
                if image.width * image.height <= max_source_pixels:
                    files.append(name)
    if max_images is not None:
        if max_images <= 0:
            raise ValueError(f'max_images must be positive, got {max_images}')
        files = files[:max_images]
    if not files:
        raise ValueError(f'category {category!r} holds no PNG files')
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    for i, name in enumerate(files):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(os.path.join(folder, name)) as image:
                square = to_square_rgb(image, resolution)
        buffer = io.BytesIO()
        square.save(buffer, format='PNG')
        file_name = f'{i:04d}.png'
        atomic_write_bytes(os.path.join(output_dir, file_name), buffer.getvalue())
        rows.append({'file_name': file_name, 'text': caption_template.format(title=title_from_filename(name)),
                     'source': f'openclipart-png:{category}/{name}'})
    atomic_write_bytes(os.path.join(output_dir, 'metadata.jsonl'),
                       ''.join(json.dumps(r) + '\n' for r in rows).encode())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--category', default='food/fruit', help='folder under /usr/share/openclipart/png')
    parser.add_argument('--output_dir', required=True)
    parser.add_argument('--resolution', type=int, default=128)
    parser.add_argument('--max_images', type=int, default=None)
    parser.add_argument('--caption_template', default='{title}, clipart style')
    parser.add_argument('--max_source_pixels', type=int, default=40_000_000)
    args = parser.parse_args()
    rows = make_styleset(args.category, args.output_dir, args.resolution, args.max_images, args.caption_template,
                         args.max_source_pixels)
    print(f'{len(rows)} images of {args.category!r} at {args.resolution}px written to {args.output_dir}; '
          f'first caption: {rows[0]["text"]!r}')


if __name__ == '__main__':
    main()
