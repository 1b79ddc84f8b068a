"""Image–text retrieval: the losses that align two towers and the recall metrics that score them.

Tensor functions with no dependency on open_clip (the model glue is :mod:`visadapt.integrations.open_clip_models`,
the trainer is :mod:`visadapt.apps.train_clip`), and the data/evaluation helpers of the retrieval trainer.

Loss (embeddings are L2-normalised inside, so similarities are cosines; the contrastive alternative with a learned
temperature is open_clip's own ``ClipLoss``):

* :func:`triplet_loss`: the triplet loss of Schroff et al. ("FaceNet", arXiv:1503.03832) in both directions with the
  hardest in-batch negative, as in VSE++ (Faghri et al., arXiv:1707.05612) and the retrieval setup of the SeRA
  paper ("Vector Segmented and Recombined Adaptation for Scalable and Efficient Model Tuning", section 4.2): for a
  matching pair (i, t) with similarity s(i, t),
  ``max(0, m + max_{t'} s(i, t') - s(i, t)) + max(0, m + max_{i'} s(i', t) - s(i, t))``, averaged over the batch.
It takes optional ``image_ids``: batch items with the same id are the same image (two captions of one image in one
batch), so they are never used as each other's negatives.

Metrics (:func:`retrieval_recall`), exactly as the SeRA paper's footnote defines R@K:

* image→text: an image is a hit at K if **any** of its captions ranks in the top K of all captions by cosine
  similarity; text→image: a caption is a hit at K if its image ranks in the top K of all images;
* each R@K is the percentage of hits over all queries (images for i2t, captions for t2i); ``sum`` adds the six values.

Ties are resolved against the model (``ties='pessimistic'``, the default): a wrong candidate with a similarity
*equal* to the best correct one ranks ahead of it, so a collapsed model that maps everything to one point scores 0,
not 100. An image's own captions never push each other down: the rank of an image's best caption counts only other
images' captions. ``ties='optimistic'`` counts only strictly greater wrong candidates instead.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
from typing import (
    Any,
    Callable,
    ContextManager,
    Dict,
    Hashable,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
import torch.nn as nn
import torch.nn.functional as F

from visadapt.core import atomic_write_files

__all__ = ['triplet_loss', 'retrieval_recall', 'RECALL_KEYS', 'TIE_RULES', 'read_pairs', 'split_by_image',
           'write_csv_split', 'CSV_IMAGE_KEY', 'CSV_CAPTION_KEY', 'embed_images', 'embed_texts', 'embed_batches',
           'evaluate_retrieval']

PathLike = Union[str, os.PathLike]

TIE_RULES = ('pessimistic', 'optimistic')
#: keys of :func:`retrieval_recall`'s result for ks=(1, 5, 10), in the SeRA paper's table order
RECALL_KEYS = ('r1_i2t', 'r1_t2i', 'r5_i2t', 'r5_t2i', 'r10_i2t', 'r10_t2i', 'sum')


def _check_pair(image_emb: torch.Tensor, text_emb: torch.Tensor, image_ids: Optional[torch.Tensor]) -> None:
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f'image and text embeddings must both be (B, D) with the same shape; got '
                         f'{tuple(image_emb.shape)} and {tuple(text_emb.shape)}')
    if image_emb.shape[0] < 2:
        raise ValueError(f'a contrastive batch needs at least 2 pairs, got {image_emb.shape[0]}')
    if image_ids is not None and tuple(image_ids.shape) != (image_emb.shape[0],):
        raise ValueError(f'image_ids must have shape ({image_emb.shape[0]},), got {tuple(image_ids.shape)}')


def _same_image(image_ids: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """(B, B) bool: True where items i and j show the same image (always on the diagonal)."""
    if image_ids is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    ids = image_ids.to(device)
    return ids[:, None] == ids[None, :]


def triplet_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, margin: float = 0.2,
                 image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bidirectional triplet loss with the hardest in-batch negative (VSE++ "max of hinges").

    Args:
        image_emb: Tensor[B, D] image embeddings (normalised here), row b matches ``text_emb[b]``.
        text_emb: Tensor[B, D] caption embeddings.
        margin: the margin m (> 0 in practice; 0.2 as in VSE++).
        image_ids: optional Tensor[B] image ids; items with equal ids are not negatives of each other.

    Returns:
        Scalar: mean over the B pairs of the image→text plus the text→image hinge. Zero exactly when every pair is
        at least ``margin`` more similar than its hardest negative in both directions.
    """
    _check_pair(image_emb, text_emb, image_ids)
    sim = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).t()     # (B, B): images × captions
    same = _same_image(image_ids, sim.shape[0], sim.device)
    if bool(same.all()):
        raise ValueError('every item of the batch shows the same image, so there is no negative; '
                         'batches need at least two different images')
    pos = sim.diagonal()
    neg = sim.masked_fill(same, float('-inf'))
    hardest_text = neg.max(dim=1).values            # per image: its most similar wrong caption
    hardest_image = neg.max(dim=0).values           # per caption: its most similar wrong image
    # an item whose batch holds only its own image has hardest negative -inf, so its hinge is 0
    i2t = (margin + hardest_text - pos).clamp(min=0)
    t2i = (margin + hardest_image - pos).clamp(min=0)
    return (i2t + t2i).mean()


def retrieval_recall(similarity: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     ties: str = 'pessimistic', chunk: int = 1024) -> Dict[str, float]:
    """R@K image→text and text→image (in percent) and their sum, as in the SeRA paper (see the module docstring).

    Args:
        similarity: Tensor[N_img, N_txt] similarities (cosine for the paper's metric) of every image with every
            caption.
        text_image: Tensor[N_txt] (integer): the image index of each caption; every image needs at least one.
        ks: the cut-offs K (positive integers).
        ties: ``'pessimistic'`` (wrong candidates tied with the correct one rank ahead of it) or ``'optimistic'``.
        chunk: images (rows) processed at a time, bounding memory to ``chunk × N_txt``.

    Returns:
        ``{'r{k}_i2t': %, 'r{k}_t2i': %, ... , 'sum': Σ}`` with keys ordered k by k, i2t before t2i.
    """
    if ties not in TIE_RULES:
        raise ValueError(f'ties={ties!r} is not valid; use one of {TIE_RULES}')
    if similarity.dim() != 2:
        raise ValueError(f'similarity must be a (N_img, N_txt) matrix, got shape {tuple(similarity.shape)}')
    n_img, n_txt = similarity.shape
    if n_img == 0 or n_txt == 0:
        raise ValueError(f'similarity is empty (shape {tuple(similarity.shape)})')
    if text_image.dtype.is_floating_point or text_image.dtype == torch.bool or tuple(text_image.shape) != (n_txt,):
        raise ValueError(f'text_image must be an integer tensor of shape ({n_txt},) giving each caption\'s image '
                         f'index; got dtype {text_image.dtype} shape {tuple(text_image.shape)}')
    text_image = text_image.to(similarity.device, torch.long)
    if n_txt and (int(text_image.min()) < 0 or int(text_image.max()) >= n_img):
        raise ValueError(f'text_image holds image indices outside [0, {n_img}): '
                         f'min {int(text_image.min())}, max {int(text_image.max())}')
    captions_per_image = torch.bincount(text_image, minlength=n_img)
    if bool((captions_per_image == 0).any()):
        missing = torch.nonzero(captions_per_image == 0).flatten()[:5].tolist()
        raise ValueError(f'every image needs at least one caption; image(s) {missing} have none')
    if not bool(torch.isfinite(similarity).all()):
        raise ValueError('similarity contains NaN or Inf values')
    ks = list(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f'recall cut-offs must be positive integers, got {k!r}')
    ahead = torch.ge if ties == 'pessimistic' else torch.gt

    # image -> text: rank of the image's best caption among the other images' captions
    i2t_rank = torch.empty(n_img, dtype=torch.long, device=similarity.device)
    # text -> image: rank of the caption's image among all images
    t2i_rank = torch.zeros(n_txt, dtype=torch.long, device=similarity.device)
    own_sim = similarity[text_image, torch.arange(n_txt, device=similarity.device)]   # (N_txt,) s(image(t), t)
    for start in range(0, n_img, chunk):
        sim = similarity[start:start + chunk]                                           # (c, N_txt)
        rows = torch.arange(start, start + sim.shape[0], device=sim.device)
        own = text_image[None, :] == rows[:, None]                                       # (c, N_txt) captions of row
        best = sim.masked_fill(~own, float('-inf')).max(dim=1).values                   # (c,)
        i2t_rank[start:start + sim.shape[0]] = (ahead(sim, best[:, None]) & ~own).sum(dim=1)
        t2i_rank += (ahead(sim, own_sim[None, :]) & ~own).sum(dim=0)
    out: Dict[str, float] = {}
    for k in ks:
        out[f'r{k}_i2t'] = 100.0 * float((i2t_rank < k).double().mean())
        out[f'r{k}_t2i'] = 100.0 * float((t2i_rank < k).double().mean())
    out['sum'] = sum(out.values())
    return out


# ---- data ------------------------------------------------------------------------------------------------------------
def read_pairs(path: PathLike, image_key: str = 'image', caption_key: str = 'caption',
               root: Optional[PathLike] = None) -> List[Tuple[str, List[str]]]:
    """Read (image path, caption) rows from JSONL or CSV and group captions by image.

    A JSONL line is ``{"image": "a.png", "caption": "..."}``, or ``{"image": ..., "captions": [...]}`` (the key
    ``caption_key + 's'``); a CSV has a header with the two columns. Relative image paths are resolved against
    ``root`` (default: the data file's folder). Images keep the order of their first appearance.

    Returns:
        ``[(absolute image path, [caption, ...]), ...]``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'data file {path!r} not found')
    root = os.path.dirname(os.path.abspath(path)) if root is None else os.fspath(root)
    ext = os.path.splitext(path)[1].lower()
    rows: List[Tuple[int, Dict[str, Any]]] = []
    if ext in ('.jsonl', '.json'):
        with open(path, encoding='utf-8') as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((i, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise ValueError(f'{path}:{i} is not valid JSON: {err}') from None
    elif ext in ('.csv', '.tsv'):
        with open(path, encoding='utf-8', newline='') as f:
            reader = csv.DictReader(f, delimiter='\t' if ext == '.tsv' else ',')
            rows = [(i, row) for i, row in enumerate(reader, 2)]
    else:
        raise ValueError(f'data file {path!r} must be .jsonl or .csv/.tsv, got {ext!r}')
    groups: Dict[str, List[str]] = {}
    for line, row in rows:
        if not isinstance(row, dict) or image_key not in row:
            fields = sorted(row) if isinstance(row, dict) else row
            raise ValueError(f'{path}:{line} has no {image_key!r} field (fields: {fields})')
        captions = row.get(caption_key + 's') if caption_key + 's' in row else [row.get(caption_key)]
        if (not isinstance(captions, list) or not captions
                or not all(isinstance(c, str) and c.strip() for c in captions)):
            raise ValueError(f'{path}:{line} needs a non-empty string {caption_key!r} '
                             f'(or a list {caption_key + "s"!r})')
        image = os.path.join(root, str(row[image_key]))
        groups.setdefault(os.path.normpath(image), []).extend(c.strip() for c in captions)
    if not groups:
        raise ValueError(f'data file {path!r} holds no rows')
    return list(groups.items())


def split_by_image(items: Sequence[Tuple[str, List[str]]], val_fraction: float, seed: int = 0
                   ) -> Tuple[List[Tuple[str, List[str]]], List[Tuple[str, List[str]]]]:
    """Split grouped pairs into (train, val) by image, so no image has captions on both sides."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction!r}')
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * val_fraction))
    if n_val >= len(items):
        raise ValueError(f'cannot split {len(items)} image(s) with val_fraction={val_fraction}: train would be empty')
    val = sorted(order[:n_val])
    val_set = set(val)
    return [items[i] for i in range(len(items)) if i not in val_set], [items[i] for i in val]


#: the column names :func:`write_csv_split` writes: open_clip_train's ``--csv-img-key``/``--csv-caption-key`` examples
CSV_IMAGE_KEY, CSV_CAPTION_KEY = 'filepath', 'title'


def write_csv_split(data: PathLike, output_dir: PathLike, val_fraction: float = 0.2, seed: int = 0,
                    image_key: str = 'image', caption_key: str = 'caption') -> Dict[str, Any]:
    """Turn a caption file (JSONL or CSV, see :func:`read_pairs`) into open_clip_train's input: ``train.csv`` and
    ``val.csv`` in ``output_dir``, split **by image** (no image on both sides), one row per caption, columns
    ``filepath,title`` (comma-separated, absolute image paths).

    Train with ``--train-data DIR/train.csv --val-data DIR/val.csv --csv-img-key filepath --csv-caption-key title
    --csv-separator ,``. Returns the two paths and the image/caption counts of each side.
    """
    items = read_pairs(data, image_key, caption_key)
    train, val = split_by_image(items, val_fraction, seed)
    out: Dict[str, Any] = {}
    files = {}
    for split, part in (('train', train), ('val', val)):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator='\n')
        writer.writerow([CSV_IMAGE_KEY, CSV_CAPTION_KEY])
        writer.writerows([path, caption] for path, captions in part for caption in captions)
        path = os.path.join(os.fspath(output_dir), f'{split}.csv')
        files[path] = buf.getvalue().encode('utf-8')
        out[split] = {'path': path, 'images': len(part), 'captions': sum(len(c) for _, c in part)}
    atomic_write_files(files)
    return out


# ---- embedding and evaluation ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, every module's own mode restored afterwards (frozen BatchNorms stay in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _unit(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def embed_images(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised image embeddings: Tensor[N, 3, H, W] → Tensor[N, D] (float32, on the images' device)."""
    return torch.cat([_unit(model.encode_image(images[i:i + batch_size]))
                      for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def embed_texts(model: nn.Module, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised caption embeddings: Tensor[N, L] token ids → Tensor[N, D]."""
    return torch.cat([_unit(model.encode_text(tokens[i:i + batch_size]))
                      for i in range(0, tokens.shape[0], batch_size)])


@torch.no_grad()
def embed_batches(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                  image_keys: Optional[Sequence[Hashable]] = None,
                  prepare: Optional[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None,
                  autocast: Callable[[], ContextManager] = contextlib.nullcontext
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed (image, caption) rows from a loader (open_clip_train's validation DataLoader), each image only once.

    Args:
        model: an open_clip model (``encode_image`` / ``encode_text``), run in eval mode.
        batches: ``(images Tensor[B, 3, H, W], tokens Tensor[B, L])`` batches of consecutive rows, in order.
        image_keys: one key per row naming its image (e.g. the CSV's file paths): rows with the same key are
            captions of one image. None: every row is its own image.
        prepare: moves a batch to the model's device/dtype.
        autocast: a context-manager factory around the forward passes (open_clip_train's ``get_autocast``).

    Returns:
        (Tensor[N_img, D] image embeddings in order of first appearance, Tensor[N_txt, D] caption embeddings,
        Tensor[N_txt] each caption's image index): L2-normalised float32, ready for :func:`retrieval_recall`.
    """
    index: Dict[Hashable, int] = {}
    images_out, texts_out, text_image = [], [], []
    rows = 0
    with _eval_mode(model):
        for images, tokens in batches:
            if prepare is not None:
                images, tokens = prepare(images, tokens)
            end = rows + tokens.shape[0]
            keys = range(rows, end) if image_keys is None else image_keys[rows:end]
            new = []
            for j, key in enumerate(keys):
                if key not in index:
                    index[key] = len(index)
                    new.append(j)
                text_image.append(index[key])
            with autocast():
                if new:
                    images_out.append(_unit(model.encode_image(images[new])))
                texts_out.append(_unit(model.encode_text(tokens)))
            rows = end
    if image_keys is not None and rows != len(image_keys):
        raise ValueError(f'the loader gave {rows} rows but there are {len(image_keys)} image keys')
    if not rows:
        raise ValueError('the loader gave no rows')
    return torch.cat(images_out), torch.cat(texts_out), torch.tensor(text_image, dtype=torch.long)


@torch.no_grad()
def evaluate_retrieval(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, text_image: torch.Tensor,
                       batch_size: int = 64, ks: Sequence[int] = (1, 5, 10), ties: str = 'pessimistic'
                       ) -> Dict[str, float]:
    """R@K both ways and their sum (see :func:`retrieval_recall`) with cosine similarity, for tensors in memory.

    Args:
        model: an open_clip model; evaluated in eval mode (every module's mode is restored afterwards).
        images: Tensor[N_img, 3, H, W] preprocessed images.
        tokens: Tensor[N_txt, L] tokenized captions.
        text_image: Tensor[N_txt] index of each caption's image.
    """
    with _eval_mode(model):
        similarity = embed_images(model, images, batch_size) @ embed_texts(model, tokens, 4 * batch_size).t()
    return retrieval_recall(similarity, text_image, ks=ks, ties=ties)
