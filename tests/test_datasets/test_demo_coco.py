"""Tests of the synthetic COCO demo dataset generator."""
import json
import os
import os.path as osp

import numpy as np
import pytest
from pycocotools.coco import COCO

from mmsparse.datasets import DEMO_CLASSES, make_demo_coco

TINY = dict(num_train=6, num_val=3, img_size=112)


def _files(root: str) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = osp.join(dirpath, name)
            with open(path, 'rb') as f:
                out[osp.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope='module')
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_demo_coco(str(tmp_path_factory.mktemp('demo')), **TINY)


def test_deterministic(tiny: dict, tmp_path) -> None:
    again = make_demo_coco(str(tmp_path / 'again'), **TINY)
    first, second = _files(tiny['out_dir']), _files(again['out_dir'])
    assert sorted(first) == sorted(second)
    assert sum(name.endswith('.png') for name in first) == TINY['num_train'] + TINY['num_val']
    assert first == second
    other = _files(make_demo_coco(str(tmp_path / 'other'), **TINY, seed=1)['out_dir'])
    assert other['annotations/instances_train.json'] != first['annotations/instances_train.json']
    assert other['train/000000.png'] != first['train/000000.png']


def test_reuses_existing_dataset(tiny: dict) -> None:
    stamp = os.stat(tiny['train']['ann_file']).st_mtime_ns
    again = make_demo_coco(tiny['out_dir'], **TINY)
    assert tiny['generated'] and not again['generated']
    assert {k: again[k] for k in ('train', 'val')} == {k: tiny[k] for k in ('train', 'val')}
    assert os.stat(tiny['train']['ann_file']).st_mtime_ns == stamp


@pytest.mark.parametrize('split', ['train', 'val'])
def test_annotations_match_polygons(tiny: dict, split: str) -> None:
    coco = COCO(tiny[split]['ann_file'])
    assert len(coco.imgs) == tiny[split]['images'] and len(coco.anns) == tiny[split]['annotations']
    assert [c['name'] for c in coco.loadCats(sorted(coco.getCatIds()))] == list(DEMO_CLASSES)
    for img in coco.imgs.values():
        assert 0.8 * TINY['img_size'] - 1 <= min(img['width'], img['height'])
        assert max(img['width'], img['height']) <= TINY['img_size']
        assert coco.getAnnIds(imgIds=img['id']), f'image {img["id"]} has no annotation'
        assert osp.isfile(osp.join(tiny[split]['img_dir'], img['file_name']))
    for ann in coco.anns.values():
        assert ann['category_id'] in coco.cats and ann['iscrowd'] == 0
        assert ann['segmentation'] and all(len(p) >= 6 and len(p) % 2 == 0 for p in ann['segmentation'])
        mask = coco.annToMask(ann)
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann['bbox']
        assert np.allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [x, y, x + w, y + h], atol=1)
        # Contour vertices sit on the centres of the mask's boundary pixels, so the polygon's raster can
        # differ from the mask only in the one-pixel band along the outline: at most about one pixel per
        # unit of outline length (rounding at vertices adds a little).
        outline = sum(np.linalg.norm(np.diff(np.reshape(p + p[:2], (-1, 2)), axis=0), axis=1).sum()
                      for p in ann['segmentation'])
        assert abs(int(mask.sum()) - ann['area']) <= outline + 4, ann
    if split == 'train':
        assert len({a['category_id'] for a in coco.anns.values()}) >= 3


def test_mmdet_coco_dataset(tiny: dict) -> None:
    from mmdet.datasets import CocoDataset
    dataset = CocoDataset(metainfo=dict(classes=DEMO_CLASSES), data_root=tiny['out_dir'],
                          ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                          pipeline=[], test_mode=False)
    assert len(dataset) == TINY['num_train']
    with open(tiny['train']['ann_file']) as f:
        num_anns = len(json.load(f)['annotations'])
    instances = [inst for i in range(len(dataset)) for inst in dataset[i]['instances']]
    assert len(instances) == num_anns
    for inst in instances:
        assert inst['mask'] and inst['ignore_flag'] == 0
        assert 0 <= inst['bbox_label'] < len(DEMO_CLASSES)
        x1, y1, x2, y2 = inst['bbox']
        assert x2 > x1 and y2 > y1
    assert osp.isfile(dataset[0]['img_path'])


@pytest.mark.parametrize('kwargs', [dict(num_train=0), dict(num_val=-1), dict(img_size=63), dict(seed=-1),
                                    dict(max_objects=0), dict(num_train=2.5)])
def test_bad_arguments(tmp_path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_demo_coco(str(tmp_path), **kwargs)
    assert not os.listdir(tmp_path)
