"""Every shipped config parses, and every model config builds (catches stale keys and types)."""
import glob
import os.path as osp

import pytest
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

import mmsparse  # noqa: F401

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'), recursive=True)
                 if '_base_' not in p and f'{osp.sep}deploy{osp.sep}' not in p)


@pytest.mark.parametrize('path', CONFIGS, ids=[osp.relpath(p, ROOT) for p in CONFIGS])
def test_config_builds(path):
    cfg = Config.fromfile(path)
    assert 'mmsparse' in cfg.custom_imports['imports']
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model_cfg = cfg.model.copy()
    inner = model_cfg.get('model', model_cfg)
    if inner.get('backbone', {}).get('init_cfg'):
        inner['backbone']['init_cfg'] = None   # no downloads in tests
    model = MODELS.build(model_cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
