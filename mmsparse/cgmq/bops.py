"""BOPs accounting: MACs per quantized layer from a shape-tracing forward, budgets, report table.

``BOPs_l = MACs_l · b_w,l · b_a,l`` over the CGMQ layers; the relative BOPs are the share of the same
layers at 32/32 bits. Layers that are not CGMQ layers (e.g. mmdet's mask-head deconvolution, which is
an ``nn.ConvTranspose2d``) are not counted.

MACs come from forward hooks during one ``no_grad`` eval-mode forward at a fixed input shape:

* two-stage detectors (``extract_feat`` + ``roi_head``): backbone and neck on a zero image, the RPN
  head's raw ``forward`` (no NMS, so no data dependence), then ``roi_head.forward`` on exactly
  ``num_rois`` fixed synthetic proposals. ``StandardRoIHead.forward`` runs its mask branch on the
  first 100 RoIs, so mask heads count ``min(num_rois, 100)`` RoIs (as mmdet's own complexity path);
* single-stage detectors (``extract_feat`` + ``bbox_head``): ``bbox_head.forward`` on the features;
* any other model: ``model(x, mode='tensor')`` for MMEngine models, else ``model(x)``.

A conv layer counts ``numel(output) · (C_in / groups) · k_h · k_w`` MACs and a linear layer
``numel(output) · in_features``, for a batch of one image.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.macs import MacCounter
from ..utils import unwrap
from .layers import CGMQMixin


def cgmq_layers(model: nn.Module) -> List[Tuple[str, CGMQMixin]]:
    """All CGMQ layers of ``model`` with their names."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, CGMQMixin)]


def _synthetic_proposals(num_rois: int, height: int, width: int) -> torch.Tensor:
    """``num_rois`` deterministic boxes of several sizes spread over the image."""
    g = torch.Generator().manual_seed(0)
    centers = torch.rand(num_rois, 2, generator=g) * torch.tensor([width, height])
    sizes = (0.05 + 0.5 * torch.rand(num_rois, 2, generator=g)) * torch.tensor([width, height])
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    return boxes


def _run_model(model: nn.Module, input_shape: Sequence[int], num_rois: int) -> None:
    c, h, w = input_shape
    device = next(model.parameters()).device
    x = torch.zeros(1, c, h, w, device=device)
    if hasattr(model, 'extract_feat') and getattr(model, 'roi_head', None) is not None:
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData
        meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), scale_factor=(1., 1.),
                    batch_input_shape=(h, w))
        samples = [DetDataSample(metainfo=meta)]
        feats = model.extract_feat(x)
        if getattr(model, 'rpn_head', None) is not None:
            model.rpn_head(feats)
        proposals = InstanceData(bboxes=_synthetic_proposals(num_rois, h, w).to(device))
        model.roi_head.forward(feats, [proposals], samples)
    elif hasattr(model, 'extract_feat') and getattr(model, 'bbox_head', None) is not None:
        model.bbox_head(model.extract_feat(x))
    else:
        try:
            model(x, mode='tensor')
        except TypeError:
            model(x)


@torch.no_grad()
def trace_macs(model: nn.Module, input_shape: Sequence[int] = (3, 800, 1333),
               num_rois: int = 512) -> Dict[str, int]:
    """Measure and store (``layer.macs``) the MACs of every CGMQ layer; return ``{name: MACs}``.

    Runs in eval mode (batch-norm statistics untouched) and restores the training flags.

    Raises:
        ValueError: no CGMQ layer, or a CGMQ layer the forward never reached.
    """
    model = unwrap(model)
    layers = cgmq_layers(model)
    if not layers:
        raise ValueError('the model has no CGMQ layer: set conv_cfg to CGMQConv2d or use '
                         'ConvertedModel with CGMQConv2d / CGMQLinear rules')
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with MacCounter(model, [name for name, _ in layers]) as counter:
            _run_model(model, input_shape, num_rois)
    finally:
        for m, mode in modes.items():
            m.training = mode
    counts = counter.counts
    unreached = [n for n, c in counts.items() if c == 0]
    if unreached:
        raise ValueError(f'the MACs-tracing forward did not reach CGMQ layers {unreached[:5]}'
                         f'{"..." if len(unreached) > 5 else ""}; their cost cannot be counted')
    for name, layer in layers:
        layer.macs = counts[name]
    return counts


@dataclass
class BOPsRow:
    """One row of the BOPs report."""

    name: str
    macs: int
    bits_w: int
    bits_a: int

    @property
    def bops(self) -> int:
        """``MACs · b_w · b_a``."""
        return self.macs * self.bits_w * self.bits_a


def bops_rows(model: nn.Module) -> List[BOPsRow]:
    """Per-layer MACs and current bit widths (MACs must have been traced)."""
    rows = []
    for name, layer in cgmq_layers(model):
        if layer.macs is None:
            raise RuntimeError(f'MACs of {name!r} were not traced: call trace_macs first')
        rows.append(BOPsRow(name, layer.macs, layer.bits_w, layer.bits_a))
    return rows


def total_bops(layers) -> int:
    """Current BOPs of an iterable of CGMQ layers."""
    return sum(layer.bops() for layer in layers)


def full_precision_bops(layers) -> int:
    """BOPs of the same layers at 32/32 bits."""
    return sum(layer.macs * 32 * 32 for layer in layers)


def min_bops(layers) -> int:
    """BOPs of the same layers at 2/2 bits (2/32 for layers without activation quantization)."""
    return sum(layer.macs * 2 * (2 if layer.quant_act else 32) for layer in layers)


def resolve_budget(layers, relative: Optional[float] = None,
                   gbops: Optional[float] = None) -> int:
    """The budget in BOPs; raises ``ValueError`` when it is malformed or below the all-2-bit model."""
    layers = list(layers)
    full = full_precision_bops(layers)
    budget = int(relative * full) if relative is not None else int(gbops * 1e9)
    floor = min_bops(layers)
    if budget < floor:
        given = (f'relative budget {relative:.6g}' if relative is not None
                 else f'budget {gbops:.6g} GBOPs')
        raise ValueError(
            f'CGMQ: unreachable {given}: the all-2-bit model already costs {floor / 1e9:.4f} GBOPs '
            f'(relative {floor / full:.6g} of the 32/32-bit model, {full / 1e9:.4f} GBOPs) at the '
            'configured input shape; raise the budget to at least that')
    return budget


def check_budget_args(relative: Optional[float], gbops: Optional[float]) -> None:
    """Validate the budget arguments (exactly one, in range) without a model."""
    if (relative is None) == (gbops is None):
        raise ValueError('CGMQ: give exactly one of budget_relative (share of the 32/32-bit BOPs, '
                         f'e.g. 16/1024 for 4/4 bits) and budget_gbops; got budget_relative='
                         f'{relative!r}, budget_gbops={gbops!r}')
    if relative is not None and not (isinstance(relative, (int, float)) and 0 < relative <= 1):
        raise ValueError(f'CGMQ: budget_relative must be in (0, 1] (a share of the 32/32-bit BOPs, '
                         f'e.g. (4*4)/(32*32) = 0.015625), got {relative!r}')
    if gbops is not None and not (isinstance(gbops, (int, float)) and gbops > 0):
        raise ValueError(f'CGMQ: budget_gbops must be a positive number, got {gbops!r}')


def bit_histogram(model: nn.Module) -> Dict[str, int]:
    """``{'w4': count, 'a8': count, ...}`` over the CGMQ layers."""
    hist: Dict[str, int] = {}
    for _, layer in cgmq_layers(model):
        for key in (f'w{layer.bits_w}', f'a{layer.bits_a}'):
            hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: (kv[0][0], int(kv[0][1:]))))


def format_bops_report(model: nn.Module, budget: Optional[int] = None) -> str:
    """Table of MACs, bits w/a, BOPs and BOPs share per CGMQ layer, plus totals."""
    rows = bops_rows(model)
    total = sum(r.bops for r in rows)
    full = sum(r.macs * 1024 for r in rows)
    table = [('layer', 'MACs', 'w', 'a', 'GBOPs', 'share')]
    for r in rows:
        table.append((r.name, f'{r.macs:,}', str(r.bits_w), str(r.bits_a), f'{r.bops / 1e9:.4f}',
                      f'{r.bops / max(total, 1):.2%}'))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(t, widths)) for t in table]
    lines.append(f'{len(rows)} CGMQ layers; BOPs {total / 1e9:.4f} G = {total / max(full, 1):.6f} of '
                 f'32/32 ({full / 1e9:.4f} G)' + (
                     '' if budget is None else
                     f'; budget {budget / 1e9:.4f} G = {budget / max(full, 1):.6f} '
                     f'({"within" if total <= budget else "OVER"} budget)'))
    lines.append(f'bit histogram: {bit_histogram(model)}')
    return '\n'.join(lines)
