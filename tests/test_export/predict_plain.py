"""Predictions of a detector on image files, as flat numpy arrays (shared by the parity tests).

Run as a script it is the *stock mmdet* side of the parity test: it refuses to import mmsparse,
builds the model from a plain config, loads the checkpoint with mmengine's stock loader (torch's
``weights_only=True`` default) strictly, and saves the predictions to an ``.npz``::

    python predict_plain.py CONFIG CHECKPOINT OUT.npz IMG [IMG ...]
"""
import sys


def predict(model, cfg, images):
    """``{f'{i}_{field}': array}`` of bboxes, scores, labels, masks for each image path."""
    import torch
    from mmcv.transforms import Compose
    from mmengine.dataset import pseudo_collate

    pipeline = [dict(t) for t in cfg.test_dataloader.dataset.pipeline
                if t['type'] not in ('LoadAnnotations', 'mmdet.LoadAnnotations')]
    for t in pipeline:
        if t['type'] == 'PackDetInputs':
            t['meta_keys'] = ('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    pipeline = Compose(pipeline)
    model.eval()
    out = {}
    for i, path in enumerate(images):
        data = pseudo_collate([pipeline(dict(img_path=path, img_id=i))])
        with torch.no_grad():
            pred = model.test_step(data)[0].pred_instances
        for field in ('bboxes', 'scores', 'labels', 'masks'):
            if field in pred:
                out[f'{i}_{field}'] = pred[field].cpu().numpy()
    return out


class _RefuseMmsparse:
    """Meta-path finder that makes any ``import mmsparse`` fail in the stock-mmdet process."""

    def find_spec(self, name, path=None, target=None):  # noqa: D102
        if name == 'mmsparse' or name.startswith('mmsparse.'):
            raise ImportError(f'{name} imported in the stock mmdet process')
        return None


def main(argv):
    sys.meta_path.insert(0, _RefuseMmsparse())
    import numpy as np
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.registry import MODELS
    from mmengine.runner import load_checkpoint

    config, checkpoint, out_file, *images = argv
    register_all_modules()
    cfg = Config.fromfile(config)
    model = MODELS.build(cfg.model)
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    result = predict(model, cfg, images)
    assert 'mmsparse' not in sys.modules, 'mmsparse was imported'
    result['mmsparse_imported'] = np.array(any(m.split('.')[0] == 'mmsparse' for m in sys.modules))
    np.savez(out_file, **result)


if __name__ == '__main__':
    main(sys.argv[1:])
