"""Make a small, real image–caption retrieval set from Debian's ``openclipart-png`` package (public-domain clip art).

Every image gets up to three captions, all from the artist's own metadata: Inkscape wrote the SVG's title and
description into each PNG's ``tEXt`` chunks (``Title``, ``Description``). Titles shared by many files (a set's name,
such as "Lemon SVG theme" or "AIGA_Symbol_Signs") say nothing about one image; for those the file name stands in
(e.g. ``aiga_baggage_check_in1.png`` → "aiga baggage check in1"). Captions:

1. the title (``"Soft Blue Couch"``);
2. the title with its category folder (``"Soft Blue Couch, buildings furniture"``);
3. the description, when it is a real sentence (not an e-mail address, a URL, a copy of the title or a set's
   description shared by many files).

Images are composited on white, padded to a centred square and resized to ``--resolution``. The output is a folder
of PNGs and a ``captions.jsonl`` with one ``{"image": "<file>", "caption": "<text>"}`` line per caption (paths
relative to the JSONL); ``visadapt.apps.retrieval.write_csv_split`` turns it into the train/val CSV files that
``visadapt-train-clip`` (open_clip's ``CsvDataset``) reads, split by image. Images are sampled at random (``--seed``)
from all categories except ``special/`` (gradients, patterns, page examples) and ``unsorted/``.

Usage::

    python tools/make_clipart_captions.py --output_dir data/clipart-captions --num_images 1200 --resolution 128
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import re
import sys
from typing import Dict, List, Optional

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/ helpers
from clipart import CLIPART_ROOT, to_square_rgb  # noqa: E402

from visadapt.core.io import atomic_write_bytes  # noqa: E402

SKIP_CATEGORIES = ('special', 'unsorted')
MAX_PIXELS = 4096 * 4096  # a few sources are huge posters; skip them rather than decode 100+ MB


def clean_text(text: str) -> str:
    """Underscores/dashes to spaces, whitespace collapsed."""
    return re.sub(r'\s+', ' ', re.sub(r'[_]+', ' ', text)).strip()


def title_from_filename(filename: str) -> str:
    """``'aiga_baggage_check_in1.png'`` → ``'aiga baggage check in1'`` (a trailing ``_NN`` counter is dropped)."""
    stem = re.sub(r'_\d*$', '', os.path.splitext(os.path.basename(filename))[0])
    return clean_text(re.sub(r'[-]+', ' ', stem))


def _useful_description(description: str, title: str) -> bool:
    d = description.lower()
    return (3 <= len(description) <= 120 and '@' not in d and 'http' not in d and 'www.' not in d
            and d != title.lower() and not d.startswith('eps converted'))


def read_metadata(path: str) -> Optional[Dict[str, str]]:
    """Title/description of one PNG, or None if the file cannot be read or is too large."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                return None
            info = dict(image.info)
    except (OSError, Image.DecompressionBombError):
        return None
    return {'title': clean_text(str(info.get('Title', ''))),
            'description': clean_text(str(info.get('Description', '')))}


def make_captions(output_dir: str, num_images: int = 1200, resolution: int = 128, seed: int = 0,
                  root: str = CLIPART_ROOT, shared_title_limit: int = 3) -> List[dict]:
    """Write the images and ``captions.jsonl``; returns the JSONL rows.

    Args:
        output_dir: target folder (created).
        num_images: how many images to sample (fewer if the package has fewer usable ones).
        resolution: side of the square output images.
        seed: sampling seed.
        root: the openclipart PNG folder.
        shared_title_limit: a title used by more files than this is a set name (the file name replaces it); a
            description used by more files than this is dropped.
    """
    if num_images <= 0 or resolution <= 0:
        raise ValueError(f'num_images and resolution must be positive, got {num_images} and {resolution}')
    if not os.path.isdir(root):
        raise FileNotFoundError(f'{root!r} not found; install the clip art with: apt-get install openclipart-png')
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.endswith('.png'))
    files = [f for f in files if os.path.relpath(f, root).split(os.sep)[0] not in SKIP_CATEGORIES]
    random.Random(seed).shuffle(files)
    meta = {}
    for path in tqdm(files[:3 * num_images], desc='reading metadata', unit='img'):  # 3x: some are skipped
        m = read_metadata(path)
        if m is not None:
            meta[path] = m
    title_count = collections.Counter(m['title'].lower() for m in meta.values())
    description_count = collections.Counter(m['description'].lower() for m in meta.values())
    os.makedirs(output_dir, exist_ok=True)
    rows, seen = [], set()
    chosen = [p for p in files if p in meta]
    for path in tqdm(chosen, desc='writing images', unit='img'):
        if len(seen) >= num_images:
            break
        m = meta[path]
        title = m['title']
        if not title or title_count[title.lower()] > shared_title_limit:
            title = title_from_filename(path)
        if len(title) < 2:
            continue
        category = clean_text(' '.join(os.path.relpath(os.path.dirname(path), root).split(os.sep)))
        captions = [title, f'{title}, {category}']
        if (m['description'] and _useful_description(m['description'], title)
                and description_count[m['description'].lower()] <= shared_title_limit):
            captions.append(m['description'])
        try:
            with Image.open(path) as image:
                square = to_square_rgb(image, resolution)
        except OSError:
            continue
        name = f'{len(seen):05d}.png'
        buf = io.BytesIO()
        square.save(buf, format='PNG', optimize=True)
        atomic_write_bytes(os.path.join(output_dir, name), buf.getvalue())
        seen.add(path)
        rows += [{'image': name, 'caption': c, 'source': os.path.relpath(path, root)} for c in captions]
    data = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
    atomic_write_bytes(os.path.join(output_dir, 'captions.jsonl'), data.encode())
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output_dir', required=True)
    parser.add_argument('--num_images', type=int, default=1200)
    parser.add_argument('--resolution', type=int, default=128)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--root', default=CLIPART_ROOT, help='the openclipart PNG folder')
    args = parser.parse_args(argv)
    rows = make_captions(args.output_dir, args.num_images, args.resolution, args.seed, args.root)
    images = len({r['image'] for r in rows})
    print(f'wrote {images} images and {len(rows)} captions to {os.path.join(args.output_dir, "captions.jsonl")}')


if __name__ == '__main__':
    main()
