"""Compare and evaluate a PyTorch detector and its exported backend model on the same data.

Three models take part (``tools/deploy.py --eval``): stock mmdet PyTorch, the *exported computation
run in PyTorch* (mmdeploy's rewritten graph, :func:`exported_graph_model`) and the backend (ONNX
Runtime). Backend vs exported graph measures the export and runtime error; exported graph vs stock
mmdet measures mmdeploy's own deviations from mmdet's post-processing.
"""
import copy
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

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


class TorchGraphWrapper(torch.nn.Module):
    """The exported computation run in PyTorch, behind mmdeploy's backend-wrapper interface.

    Calls the PyTorch detector under mmdeploy's ``RewriterContext`` (its rewritten heads and NMS,
    exactly what was traced into the graph) with fresh data samples, as the graph sees only the
    input tensor. Same call signature as mmdeploy's ORT wrapper: ``{input name: batch}`` in,
    ``{output name: tensor}`` out, plus ``output_to_list``.
    """

    def __init__(self, torch_model: torch.nn.Module, deploy_cfg: Config):
        from mmdeploy.utils import get_backend, get_ir_config
        super().__init__()
        self.model = torch_model
        self.deploy_cfg = deploy_cfg
        self.output_names: List[str] = list(get_ir_config(deploy_cfg)['output_names'])
        self.backend = get_backend(deploy_cfg).value
        self.opset = get_ir_config(deploy_cfg).get('opset_version', 11)

    @torch.no_grad()
    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Run the rewritten detector on the (single) input batch; outputs by name."""
        from mmdeploy.core import RewriterContext
        from mmdet.structures import DetDataSample

        from .onnx import mmdeploy_compat
        (batch,) = inputs.values()
        samples = [DetDataSample() for _ in range(len(batch))]
        with mmdeploy_compat(), RewriterContext(cfg=self.deploy_cfg, backend=self.backend,
                                                opset=self.opset):
            outputs = self.model(batch, samples, mode='predict')
        return dict(zip(self.output_names, outputs))

    def output_to_list(self, outputs: Mapping[str, torch.Tensor]) -> List[torch.Tensor]:
        """Outputs in the graph's output order (mmdeploy ``BaseWrapper.output_to_list``)."""
        return [outputs[name] for name in self.output_names]


def exported_graph_model(backend_model: torch.nn.Module, torch_model: torch.nn.Module,
                         deploy_cfg: Config) -> torch.nn.Module:
    """A copy of mmdeploy's backend model whose wrapper runs the exported graph in PyTorch.

    Only the wrapper is swapped (:class:`TorchGraphWrapper` for the ONNX Runtime session), so
    pre-processing and mmdeploy's post-processing (score filter, rescale, mask pasting) are the very
    code that runs on the backend's outputs: evaluating both isolates the export/runtime error.
    ``backend_model`` itself is left unchanged.
    """
    model = copy.copy(backend_model)
    model._modules = dict(backend_model._modules)  # own submodule table: the original keeps its wrapper
    model.wrapper = TorchGraphWrapper(torch_model, deploy_cfg)
    return model


@torch.no_grad()
def compare_graph_outputs(torch_model, backend_model, cfg: Config, deploy_cfg: Config,
                          dataloader: Optional[dict] = None) -> Dict[str, float]:
    """Max abs differences between the backend's raw outputs and the same graph run in PyTorch.

    The PyTorch side is :class:`TorchGraphWrapper` (mmdeploy's rewritten heads and NMS), i.e.
    exactly the computation that was exported, so this isolates the export and runtime numerics
    from mmdeploy's deviations from stock mmdet post-processing (:func:`compare_models`). Images run
    one at a time. Boxes are in network-input pixels.

    Returns:
        dict: ``{'<output>': max abs diff, ..., 'shape_mismatch': count, 'images': count}``.
    """
    graph = TorchGraphWrapper(torch_model, deploy_cfg)
    diffs = {name: 0.0 for name in graph.output_names}
    diffs.update(shape_mismatch=0, images=0)
    for data in _test_dataloader(cfg, dataloader):
        for sample_inputs, sample in zip(data['inputs'], data['data_samples']):
            one = torch_model.data_preprocessor(dict(inputs=[sample_inputs], data_samples=[sample]),
                                                False)
            ref = graph({'input': one['inputs']})
            out = backend_model.wrapper({'input': one['inputs']})
            diffs['images'] += 1
            for name in graph.output_names:
                value, other = ref[name], out[name]
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


def map_keys(metrics: Mapping[str, float]) -> List[str]:
    """The headline mAP keys of a metric dict (``coco/bbox_mAP``, ``coco/segm_mAP``), sorted."""
    return sorted(k for k in metrics if k.endswith('_mAP'))


def largest_map_delta(deltas: Mapping[str, float]) -> Tuple[Optional[str], float]:
    """The headline mAP key with the largest ``|delta|`` and its delta (``(None, 0.0)`` if none)."""
    keys = map_keys(deltas)
    if not keys:
        return None, 0.0
    worst = max(keys, key=lambda k: abs(deltas[k]))
    return worst, float(deltas[worst])


def _short(key: str) -> str:
    return key.split('/')[-1][:-len('_mAP')]


def format_maps(metrics: Mapping[str, float]) -> str:
    """``bbox mAP 0.270, segm mAP 0.282``: the headline mAPs of a metric dict."""
    return ', '.join(f'{_short(k)} mAP {float(metrics[k]):.3f}' for k in map_keys(metrics))


def format_deltas(deltas: Mapping[str, float]) -> str:
    """``bbox -0.90, segm -0.50 points``: the headline mAP deltas (:func:`metric_deltas`)."""
    return ', '.join(f'{_short(k)} {deltas[k]:+.2f}' for k in map_keys(deltas)) + ' points'


__all__ = ['ParityStats', 'TorchGraphWrapper', 'compare_graph_outputs', 'compare_models',
           'evaluate_model', 'exported_graph_model', 'format_deltas', 'format_maps',
           'largest_map_delta', 'map_keys', 'metric_deltas']
