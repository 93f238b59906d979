"""Fixtures of the export tests (helpers: export_helpers.py)."""
import glob
import os.path as osp

import pytest
import torch

from export_helpers import make_trained_sparse, sparse_demo_config  # noqa: F401


@pytest.fixture(scope='session')
def demo_data(tmp_path_factory):
    """Tiny generated COCO dataset; returns its root."""
    from mmsparse.datasets import make_demo_coco
    root = str(tmp_path_factory.mktemp('demo_coco'))
    make_demo_coco(root, num_train=6, num_val=3, img_size=96)
    return root


@pytest.fixture(scope='session')
def val_images(demo_data):
    return sorted(glob.glob(osp.join(demo_data, 'val', '*')))


@pytest.fixture(scope='session')
def sparse_ckpt(demo_data, tmp_path_factory):
    """``(config path, checkpoint path, model)`` of the tiny 'trained' sparse detector."""
    from mmsparse.export import build_model
    cfg = sparse_demo_config(demo_data)
    out = tmp_path_factory.mktemp('sparse')
    cfg_path = str(out / 'maxq_demo.py')
    cfg.dump(cfg_path)
    model = build_model(cfg)
    make_trained_sparse(model)
    ckpt = str(out / 'sparse.pth')
    torch.save(dict(state_dict=model.state_dict(), meta=dict(dataset_meta=dict(
        classes=('circle', 'square', 'triangle', 'star', 'ellipse')))), ckpt)
    return cfg_path, ckpt, model.eval()


@pytest.fixture(scope='session')
def folded(sparse_ckpt, tmp_path_factory):
    """:class:`~mmsparse.export.FoldResult` of the sparse checkpoint."""
    from mmsparse.export import fold_checkpoint
    cfg_path, ckpt, _ = sparse_ckpt
    return fold_checkpoint(cfg_path, ckpt, str(tmp_path_factory.mktemp('folded')))


