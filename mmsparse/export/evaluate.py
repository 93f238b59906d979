"""Compare and evaluate a PyTorch detector and its exported backend model on the same data."""
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch
from mmengine.config import Config


@dataclass
class ParityStats:
    """Differences between two models' predictions, over all images compared.

    Detections are compared in output order (both sides sort by score); images whose detection
    counts differ are counted in ``count_mismatch`` and left out of the value differences.
    """

    images: int = 0
    detections: int = 0
    count_mismatch: int = 0
    max_bbox_diff: float = 0.0      # pixels
    max_score_diff: float = 0.0
    label_mismatch: int = 0
    mask_pixel_mismatch: int = 0
    mask_pixels: int = 0
    per_image: List[dict] = field(default_factory=list)

    def format(self) -> str:
        """One-paragraph summary."""
        mask = (f', mask pixels differing {self.mask_pixel_mismatch}/{self.mask_pixels}'
                if self.mask_pixels else '')
        return (f'{self.images} images, {self.detections} detections, count mismatches '
                f'{self.count_mismatch}, max |Δbbox| {self.max_bbox_diff:.3g} px, max |Δscore| '
                f'{self.max_score_diff:.3g}, label mismatches {self.label_mismatch}{mask}')


def _test_dataloader(cfg: Config, dataloader: Optional[dict] = None):
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    loader_cfg = dict(dataloader or cfg.test_dataloader)
    loader_cfg['num_workers'] = 0
    loader_cfg['persistent_workers'] = False
    return Runner.build_dataloader(loader_cfg)


@torch.no_grad()
def compare_models(reference, candidate, cfg: Config, dataloader: Optional[dict] = None,
                   max_images: Optional[int] = None) -> ParityStats:
    """Run both models on the config's test data and measure prediction differences."""
    stats = ParityStats()
    for data in _test_dataloader(cfg, dataloader):
        refs, cands = reference.test_step(data), candidate.test_step(data)
        for ref, cand in zip(refs, cands):
            r, c = ref.pred_instances, cand.pred_instances
            stats.images += 1
            info = dict(img_path=ref.metainfo.get('img_path'), ref=len(r), cand=len(c))
            stats.per_image.append(info)
            if len(r) != len(c):
                stats.count_mismatch += 1
                continue
            stats.detections += len(r)
            if len(r) == 0:
                continue
            stats.max_bbox_diff = max(stats.max_bbox_diff,
                                      float((r.bboxes.cpu() - c.bboxes.cpu()).abs().max()))
            stats.max_score_diff = max(stats.max_score_diff,
                                       float((r.scores.cpu() - c.scores.cpu()).abs().max()))
            stats.label_mismatch += int((r.labels.cpu() != c.labels.cpu()).sum())
            if 'masks' in r and 'masks' in c:
                rm, cm = r.masks.cpu().bool(), c.masks.cpu().bool()
                if rm.shape == cm.shape:
                    stats.mask_pixel_mismatch += int((rm != cm).sum())
                    stats.mask_pixels += rm.numel()
        if max_images is not None and stats.images >= max_images:
            break
    return stats


@torch.no_grad()
def compare_graph_outputs(torch_model, backend_model, cfg: Config, deploy_cfg: Config,
                          dataloader: Optional[dict] = None) -> Dict[str, float]:
    """Max abs differences between the backend's raw outputs and the same graph run in PyTorch.

    The PyTorch side runs under mmdeploy's ``RewriterContext``, i.e. exactly the computation that
    was exported (mmdeploy's rewritten heads and NMS), so this isolates the export and runtime
    numerics from mmdeploy's deviations from stock mmdet post-processing (:func:`compare_models`).
    Boxes are in network-input pixels.

    Returns:
        dict: ``{'<output>': max abs diff, ..., 'shape_mismatch': count, 'images': count}``.
    """
    from mmdeploy.core import RewriterContext
    from mmdeploy.utils import get_backend, get_ir_config

    from .onnx import mmdeploy_compat
    names = get_ir_config(deploy_cfg)['output_names']
    backend = get_backend(deploy_cfg).value
    opset = get_ir_config(deploy_cfg).get('opset_version', 11)
    diffs = {name: 0.0 for name in names}
    diffs.update(shape_mismatch=0, images=0)
    for data in _test_dataloader(cfg, dataloader):
        for sample_inputs, sample in zip(data['inputs'], data['data_samples']):
            one = torch_model.data_preprocessor(dict(inputs=[sample_inputs], data_samples=[sample]),
                                                False)
            with mmdeploy_compat(), RewriterContext(cfg=deploy_cfg, backend=backend, opset=opset):
                ref = torch_model(one['inputs'], one['data_samples'], mode='predict')
            out = backend_model.wrapper({'input': one['inputs']})
            diffs['images'] += 1
            for name, value in zip(names, ref):
                other = out[name]
                if value.shape != other.shape:
                    diffs['shape_mismatch'] += 1
                    continue
                if value.numel():
                    diffs[name] = max(diffs[name], float((value.float() - other.float()).abs().max()))
    return diffs


@torch.no_grad()
def evaluate_model(model, cfg: Config, dataloader: Optional[dict] = None,
                   evaluator: Optional[dict] = None) -> Dict[str, float]:
    """COCO metrics of ``model`` (PyTorch or mmdeploy backend model) on the config's test split."""
    from mmengine.evaluator import Evaluator
    loader = _test_dataloader(cfg, dataloader)
    evaluator = Evaluator(dict(evaluator or cfg.test_evaluator))
    evaluator.dataset_meta = loader.dataset.metainfo
    for data in loader:
        outputs = model.test_step(data)
        evaluator.process(data_samples=outputs, data_batch=data)
    return evaluator.evaluate(len(loader.dataset))


def metric_deltas(reference: Mapping[str, float], candidate: Mapping[str, float]) -> Dict[str, float]:
    """``candidate - reference`` for the shared numeric metrics (mAP in COCO points ×100)."""
    return {k: 100 * (float(candidate[k]) - float(reference[k])) for k in reference
            if k in candidate and isinstance(reference[k], (int, float, np.floating))}


__all__ = ['ParityStats', 'compare_graph_outputs', 'compare_models', 'evaluate_model', 'metric_deltas']
