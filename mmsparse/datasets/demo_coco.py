"""Deterministic generator of a small synthetic COCO instance-segmentation dataset.

Each image shows a few filled shapes (one class per shape) with random colours, sizes and rotations on a
textured colour-gradient background. Later shapes occlude earlier ones; an annotation describes the
visible part of its shape only. With the same OpenCV and NumPy versions, the same arguments give
byte-identical files (rasterisation can change slightly between OpenCV releases).
"""
import json
import os
import os.path as osp
import re
from typing import Any, Optional

import cv2
import numpy as np

DEMO_CLASSES: tuple[str, ...] = ('circle', 'square', 'triangle', 'star', 'ellipse')

_FORMAT_VERSION = 1
_MIN_SIZE_FRAC, _MAX_SIZE_FRAC = 0.08, 0.45  # shape size as a fraction of the shorter image side
_MIN_SIZE_PX = 20  # floor on the shape size, so even tiny images get shapes worth annotating
_MIN_VISIBLE_FRAC = 0.2  # drop an object whose visible area is below this fraction of its full area
_MIN_AREA = 64  # ... or below this many pixels
_MIN_PART = 16  # visible fragments smaller than this many pixels are not annotated
_MIN_COLOUR_DIST = 90.0  # wanted RGB distance of a shape's colour from what it is drawn over
_PLACE_TRIES = 10  # attempts to place a shape (or pick its colour) before giving up
_OPEN_KERNEL = np.ones((3, 3), np.uint8)


def _shape_polygon(label: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices ``(P, 2)`` of shape ``label`` centred at the origin, ``size`` its nominal diameter."""
    r = size / 2
    angle = rng.uniform(0, 2 * np.pi)
    name = DEMO_CLASSES[label]
    if name == 'circle':
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if name == 'ellipse':
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = np.stack([1.1 * r * np.cos(t), rng.uniform(0.35, 0.6) * 1.1 * r * np.sin(t)], 1)
    elif name == 'square':
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        pts = 0.85 * np.sqrt(2) * r * np.stack([np.cos(t), np.sin(t)], 1)
    elif name == 'triangle':
        t = np.arange(3) * 2 * np.pi / 3
        pts = 1.1 * r * np.stack([np.cos(t), np.sin(t)], 1)
    else:  # star
        t = np.arange(10) * np.pi / 5
        radii = 1.1 * r * np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = radii[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T


def _rasterise(pts: np.ndarray, h: int, w: int) -> np.ndarray:
    """Boolean ``(h, w)`` mask of the polygon ``pts`` (pixel coordinates, 4 fractional bits)."""
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _clean(mask: np.ndarray) -> np.ndarray:
    """``mask`` without slivers under 3 px wide and fragments under ``_MIN_PART`` pixels."""
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _OPEN_KERNEL)
    num, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    keep = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= _MIN_PART)
    return np.isin(labels, keep[keep > 0])


def _is_kept(visible: np.ndarray, full_area: int) -> bool:
    """Whether an object with cleaned visible mask ``visible`` and full area ``full_area`` is annotated."""
    area = int(visible.sum())
    return area >= _MIN_AREA and area >= _MIN_VISIBLE_FRAC * full_area


def _has_holes(mask: np.ndarray) -> bool:
    """Whether ``mask`` encloses background (COCO polygons, being merged by union, cannot express it)."""
    _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0, :, 3] >= 0).any())


def _punches_hole(raster: np.ndarray, rasters: list[np.ndarray], visibles: list[np.ndarray]) -> bool:
    """Whether drawing ``raster`` would leave a hole in the annotation of an earlier, still annotated
    shape."""
    for full, vis in zip(rasters, visibles):
        if (vis & raster).any():
            cleaned = _clean(vis & ~raster)
            if _is_kept(cleaned, int(full.sum())) and _has_holes(cleaned):
                return True
    return False


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Float ``(h, w, 3)`` background: a colour gradient plus smooth blotches and, sometimes, stripes."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    img = c0 + t[..., None] * (c1 - c0)
    grid = int(rng.integers(3, 9))
    blotches = rng.normal(0, 1, (grid, grid, 3)).astype(np.float32)
    img += cv2.resize(blotches, (w, h), interpolation=cv2.INTER_CUBIC) * rng.uniform(10, 35)
    if rng.random() < 0.4:
        freq, phase, amp = rng.uniform(10, 40), rng.uniform(0, 2 * np.pi), rng.uniform(8, 25)
        stripe_angle = rng.uniform(0, np.pi)
        s = xx * np.cos(stripe_angle) + yy * np.sin(stripe_angle)
        img += (amp * np.sin(2 * np.pi * freq * s + phase))[..., None]
    return img


def _pick_colour(refs: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A random colour far from every colour in ``refs`` (the best of ``_PLACE_TRIES`` draws)."""
    best, best_dist = None, -1.0
    for _ in range(_PLACE_TRIES):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        dist = min(float(np.linalg.norm(colour - ref)) for ref in refs)
        if dist > best_dist:
            best, best_dist = colour, dist
        if dist >= _MIN_COLOUR_DIST:
            break
    return best


def _render_image(h: int, w: int, max_objects: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw one image; return it (uint8 BGR) and ``(label, visible mask)`` of its annotated objects."""
    img = _background(h, w, rng)
    side = min(h, w)
    labels: list[int] = []
    rasters: list[np.ndarray] = []
    visibles: list[np.ndarray] = []  # raw visible masks, updated as later shapes are drawn
    colours: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _ in range(_PLACE_TRIES):
            label = int(rng.integers(len(DEMO_CLASSES)))
            size = max(rng.uniform(_MIN_SIZE_FRAC, _MAX_SIZE_FRAC) * side, _MIN_SIZE_PX)
            margin = size / 4  # at most about half of the radius leaves the image
            centre = rng.uniform([margin, margin], [w - margin, h - margin])
            raster = _rasterise(_shape_polygon(label, size, rng) + centre, h, w)
            if raster.sum() >= _MIN_AREA and not _punches_hole(raster, rasters, visibles):
                break
        else:
            continue  # no acceptable placement found: this image gets one shape fewer
        touching = cv2.dilate(raster.astype(np.uint8), _OPEN_KERNEL, iterations=2).astype(bool)
        refs = [img[raster].mean(0)] + [colours[i] for i, vis in enumerate(visibles)
                                        if (vis & touching).any()]
        colour = _pick_colour(refs, rng)
        direction = rng.normal(0, 1, 2)
        ys, xs = np.nonzero(raster)
        shade = (((xs - centre[0]) * direction[0] + (ys - centre[1]) * direction[1])
                 / np.linalg.norm(direction))
        img[raster] = colour + (rng.uniform(0, 25) * shade / size)[:, None]
        for vis in visibles:
            vis &= ~raster
        labels.append(label)
        rasters.append(raster)
        visibles.append(raster.copy())
        colours.append(colour)
    img += rng.normal(0, rng.uniform(2, 8), img.shape).astype(np.float32)
    objects = []
    for label, raster, vis in zip(labels, rasters, visibles):
        cleaned = _clean(vis)
        if _is_kept(cleaned, int(raster.sum())):
            objects.append((label, cleaned))
    return np.clip(np.round(img), 0, 255).astype(np.uint8), objects


def _annotation(mask: np.ndarray) -> dict[str, Any]:
    """COCO ``segmentation`` (polygons), ``bbox`` (tight, xywh) and ``area`` of a boolean mask."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return dict(segmentation=[[int(v) for v in c.reshape(-1)] for c in contours],
                bbox=[x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                area=int(mask.sum()))


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(',', ':')).encode()


def _split_paths(out_dir: str, split: str) -> tuple[str, str]:
    """Image directory and annotation file of ``split``."""
    return osp.join(out_dir, split), osp.join(out_dir, 'annotations', f'instances_{split}.json')


def _write_split(out_dir: str, split: str, num_images: int, img_size: int, max_objects: int,
                 rng: np.random.Generator) -> dict[str, int]:
    """Generate and write one split; return its image and annotation counts."""
    img_dir, ann_file = _split_paths(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        h, w = (int(round(f * img_size)) for f in rng.uniform(0.8, 1.0, 2))
        objects: list[tuple[int, np.ndarray]] = []
        while not objects:  # at least one annotated object per image
            img, objects = _render_image(h, w, max_objects, rng)
        file_name = f'{image_id - 1:06d}.png'
        _atomic_write(osp.join(img_dir, file_name), cv2.imencode('.png', img)[1].tobytes())
        images.append(dict(id=image_id, file_name=file_name, width=w, height=h))
        for label, mask in objects:
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=label + 1,
                                    iscrowd=0, **_annotation(mask)))
    stale = ({f for f in os.listdir(img_dir) if re.fullmatch(r'\d{6}\.png', f)}
             - {i['file_name'] for i in images})
    for name in sorted(stale):  # left by an earlier, larger generation
        os.remove(osp.join(img_dir, name))
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(DEMO_CLASSES)]
    coco = dict(info=dict(description=f'mmsparse synthetic shapes ({split})', version=str(_FORMAT_VERSION)),
                images=images, annotations=annotations, categories=categories)
    _atomic_write(ann_file, _json_bytes(coco))
    return dict(images=len(images), annotations=len(annotations))


def _load_meta(path: str) -> Optional[dict[str, Any]]:
    """Contents of ``meta.json``, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def make_demo_coco(out_dir: str, num_train: int = 300, num_val: int = 60, img_size: int = 320, seed: int = 0,
                   max_objects: int = 6) -> dict[str, Any]:
    """Write a synthetic COCO instance-segmentation dataset of shapes to ``out_dir``.

    Layout: ``train/*.png``, ``val/*.png``, ``annotations/instances_{train,val}.json`` and ``meta.json``
    (the arguments, written last). When ``meta.json`` shows a complete dataset made with the same
    arguments, nothing is regenerated.

    Args:
        out_dir: Output directory (created if missing).
        num_train: Number of training images.
        num_val: Number of validation images.
        img_size: Nominal image side; each image's width and height are drawn from
            ``[0.8, 1.0] * img_size``.
        seed: Seed of the generator; train and val use independent child streams.
        max_objects: Maximum number of shapes drawn per image (at least one is annotated).

    Returns:
        Summary: ``out_dir``, ``classes``, ``generated`` (False when an existing dataset was reused)
        and, per split, ``img_dir``, ``ann_file`` and the ``images`` and ``annotations`` counts.

    Raises:
        ValueError: On a non-positive count, ``img_size < 64`` or a negative seed.
    """
    for name, value, low in (('num_train', num_train, 1), ('num_val', num_val, 1), ('img_size', img_size, 64),
                             ('max_objects', max_objects, 1), ('seed', seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')
    args = dict(num_train=int(num_train), num_val=int(num_val), img_size=int(img_size), seed=int(seed),
                max_objects=int(max_objects))
    meta_file = osp.join(out_dir, 'meta.json')
    meta = _load_meta(meta_file)
    splits = ('train', 'val')
    generated = not (meta is not None and meta.get('version') == _FORMAT_VERSION and meta.get('args') == args
                     and all(osp.isfile(_split_paths(out_dir, s)[1]) for s in splits))
    if generated:
        if osp.exists(meta_file):
            os.remove(meta_file)  # the dataset is incomplete until the new meta.json is written
        os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
        train_rng, val_rng = np.random.default_rng(args['seed']).spawn(2)
        size, objs = args['img_size'], args['max_objects']
        counts = dict(train=_write_split(out_dir, 'train', args['num_train'], size, objs, train_rng),
                      val=_write_split(out_dir, 'val', args['num_val'], size, objs, val_rng))
        _atomic_write(meta_file, _json_bytes(dict(version=_FORMAT_VERSION, args=args, counts=counts)))
    else:
        counts = meta['counts']
    summary: dict[str, Any] = dict(out_dir=out_dir, classes=list(DEMO_CLASSES), generated=generated)
    for split in splits:
        img_dir, ann_file = _split_paths(out_dir, split)
        summary[split] = dict(img_dir=img_dir, ann_file=ann_file, **counts[split])
    return summary
