#!/usr/bin/env python
"""Cut the stardist nucleus image into tiles: a COCO instance data set (Mask R-CNN) and semantic masks (UperNet).

The data: ``img2d.tif`` (512×512 fluorescence image, 2018 Data Science Bowl, Caicedo et al., Nature Methods 2019)
and ``mask2d.tif`` (its instance label image: 0 background, 1..N one label per nucleus) ship inside the ``stardist``
pip package. They are read from, in order: ``--source`` (a stardist wheel, sdist or folder), the installed
``stardist`` package (``pip install --no-deps stardist``; it is not imported), or a wheel that this tool downloads
with ``pip download --no-deps stardist`` into ``~/.cache/visadapt/stardist``.

Split: the rightmost ``--val-width`` pixel columns are the validation region (tiles without overlap), the rest is
the training region (tiles every ``--stride`` pixels), so no validation pixel is seen in training.

Writes (under ``--out``)::

    images/{train,val}/<tile>.png            8-bit grey image tiles
    annotations/instances_{train,val}.json   COCO instances: one category 'nucleus', bbox [x, y, w, h], RLE masks
    seg_maps/{train,val}/<tile>.png          semantic masks: 0 background, 1 nucleus
    dataset.json                             what was made and from where

Nuclei cut by a tile border are kept when at least ``--min-area`` pixels remain inside the tile.

    python tools/make_stardist_coco.py --out data/stardist --tile 128 --stride 64
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np

IMAGE, MASK = 'img2d.tif', 'mask2d.tif'
CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'visadapt', 'stardist')


def _atomic_write(path: str, data: bytes) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from visadapt.core.io import atomic_write_bytes
    atomic_write_bytes(path, data)


def _read_tif(data: bytes) -> np.ndarray:
    import tifffile
    return tifffile.imread(io.BytesIO(data))


def _from_archive(path: str) -> Tuple[bytes, bytes]:
    found: Dict[str, bytes] = {}
    if path.endswith(('.whl', '.zip')):
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                base = os.path.basename(name)
                if base in (IMAGE, MASK) and '/data/images/' in '/' + name:
                    found[base] = zf.read(name)
    elif path.endswith(('.tar.gz', '.tgz', '.tar')):
        with tarfile.open(path) as tf:
            for member in tf.getmembers():
                base = os.path.basename(member.name)
                if member.isfile() and base in (IMAGE, MASK) and '/data/images/' in '/' + member.name:
                    found[base] = tf.extractfile(member).read()
    else:
        raise ValueError(f'--source {path!r} is not a wheel (.whl), sdist (.tar.gz) or folder')
    if set(found) != {IMAGE, MASK}:
        raise ValueError(f'{path!r} does not contain stardist/data/images/{IMAGE} and {MASK}')
    return found[IMAGE], found[MASK]


def _from_dir(path: str) -> Tuple[bytes, bytes]:
    for root in (path, os.path.join(path, 'images'), os.path.join(path, 'data', 'images'),
                 os.path.join(path, 'stardist', 'data', 'images')):
        if os.path.isfile(os.path.join(root, IMAGE)) and os.path.isfile(os.path.join(root, MASK)):
            with open(os.path.join(root, IMAGE), 'rb') as f, open(os.path.join(root, MASK), 'rb') as g:
                return f.read(), g.read()
    raise ValueError(f'folder {path!r} holds no {IMAGE}/{MASK} (looked in it and in its data/images)')


def load_stardist(source: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray, str]:
    """(image (H, W), instance labels (H, W), where they came from)."""
    if source is not None:
        if not os.path.exists(source):
            raise FileNotFoundError(f'--source {source!r} does not exist')
        img, mask = _from_dir(source) if os.path.isdir(source) else _from_archive(source)
        origin = source
    else:
        spec = importlib.util.find_spec('stardist')  # locates the package without importing it (needs TensorFlow)
        if spec is not None and spec.submodule_search_locations:
            origin = os.path.join(list(spec.submodule_search_locations)[0], 'data', 'images')
            img, mask = _from_dir(origin)
        else:
            wheels = sorted(glob.glob(os.path.join(CACHE, 'stardist-*')))
            if not wheels:
                print(f'stardist is not installed; downloading its wheel (no dependencies) into {CACHE}')
                subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', 'stardist', '-d', CACHE],
                               check=True)
                wheels = sorted(glob.glob(os.path.join(CACHE, 'stardist-*')))
            origin = wheels[-1]
            img, mask = _from_archive(origin)
    image, labels = _read_tif(img), _read_tif(mask)
    if image.ndim != 2 or labels.shape != image.shape:
        raise ValueError(f'expected a 2-D image and a label image of the same shape, got {image.shape} and '
                         f'{labels.shape}')
    return image, labels, origin


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Grey values as uint8: kept when they fit in 0..255 (img2d.tif: 0..235), else min-max scaled."""
    image = np.asarray(image)
    if image.min() >= 0 and image.max() <= 255:
        return image.astype(np.uint8)
    lo, hi = float(image.min()), float(image.max())
    return np.round((image - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)


def tile_origins(length: int, tile: int, stride: int) -> List[int]:
    """Start offsets covering [0, length) with ``tile``-long windows every ``stride`` (the last one flush)."""
    if length < tile:
        return []
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def instances(labels: np.ndarray, min_area: int) -> List[Dict]:
    """COCO annotations (without ids) of the instance label tile ``labels`` (H, W)."""
    from pycocotools import mask as mask_utils
    out = []
    for label in np.unique(labels):
        if label == 0:
            continue
        binary = labels == label
        area = int(binary.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(binary)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
        rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
        rle['counts'] = rle['counts'].decode('ascii')
        out.append({'category_id': 1, 'bbox': [x0, y0, x1 - x0 + 1, y1 - y0 + 1], 'area': area,
                    'segmentation': rle, 'iscrowd': 0})
    return out


def _png(array: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format='PNG')
    return buf.getvalue()


def make_dataset(out: str, tile: int = 128, stride: int = 64, val_width: int = 128, min_area: int = 10,
                 source: Optional[str] = None) -> Dict:
    """Write the tiles and annotations under ``out``; returns the summary also written to ``dataset.json``."""
    for name, value in (('tile', tile), ('stride', stride), ('val_width', val_width), ('min_area', min_area)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f'--{name.replace("_", "-")} must be a positive integer, got {value!r}')
    image, labels, origin = load_stardist(source)
    height, width = image.shape
    if val_width >= width or tile > val_width or tile > width - val_width or tile > height:
        raise ValueError(f'--tile {tile} / --val-width {val_width} do not fit the {width}x{height} image: need '
                         f'tile <= val-width < width and tile <= width - val-width')
    image = to_uint8(image)
    regions = {'train': (0, width - val_width, stride), 'val': (width - val_width, width, tile)}
    summary = {'source': origin, 'image_size': [height, width], 'tile': tile, 'stride': stride,
               'val_width': val_width, 'min_area': min_area, 'splits': {}}
    for split, (x_lo, x_hi, step) in regions.items():
        coco = {'images': [], 'annotations': [],
                'categories': [{'id': 1, 'name': 'nucleus', 'supercategory': 'cell'}],
                'info': {'description': f'stardist img2d.tif nuclei, {split} tiles of {tile}px', 'version': '1.0'}}
        for y in tile_origins(height, tile, step):
            for x in tile_origins(x_hi - x_lo, tile, step):
                x_abs = x_lo + x
                name = f'tile_y{y:04d}_x{x_abs:04d}.png'
                crop = labels[y:y + tile, x_abs:x_abs + tile]
                _atomic_write(os.path.join(out, 'images', split, name), _png(image[y:y + tile, x_abs:x_abs + tile]))
                _atomic_write(os.path.join(out, 'seg_maps', split, name), _png((crop > 0).astype(np.uint8)))
                image_id = len(coco['images']) + 1
                coco['images'].append({'id': image_id, 'file_name': name, 'height': tile, 'width': tile})
                for ann in instances(crop, min_area):
                    coco['annotations'].append({'id': len(coco['annotations']) + 1, 'image_id': image_id, **ann})
        _atomic_write(os.path.join(out, 'annotations', f'instances_{split}.json'), json.dumps(coco).encode())
        summary['splits'][split] = {'images': len(coco['images']), 'instances': len(coco['annotations'])}
    _atomic_write(os.path.join(out, 'dataset.json'), json.dumps(summary, indent=2).encode())
    return summary


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--tile', type=int, default=128, help='tile size in pixels (default 128)')
    parser.add_argument('--stride', type=int, default=64, help='training tile stride in pixels (default 64)')
    parser.add_argument('--val-width', type=int, default=128,
                        help='width of the validation strip on the right of the image (default 128)')
    parser.add_argument('--min-area', type=int, default=10,
                        help='drop nucleus parts with fewer pixels inside a tile (default 10)')
    parser.add_argument('--source', default=None, help='a stardist wheel, sdist or folder with img2d.tif/mask2d.tif')
    args = parser.parse_args(argv)
    try:
        summary = make_dataset(args.out, args.tile, args.stride, args.val_width, args.min_area, args.source)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    for split, info in summary['splits'].items():
        print(f'{split}: {info["images"]} tiles, {info["instances"]} nucleus instances')
    print(f'wrote {os.path.abspath(args.out)} (from {summary["source"]})')


if __name__ == '__main__':
    main()
