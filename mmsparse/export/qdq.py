"""ONNX export with QuantizeLinear / DequantizeLinear nodes for models containing CGMQ layers.

In export mode every CGMQ layer emits, through the TorchScript exporter (``dynamo=False``):

* weights: its quantized (folded) weight through a per-output-channel ``QuantizeLinear`` →
  ``DequantizeLinear`` pair (int8, zero point 0, axis 0; opset ≥ 13). A b-bit weight (b ≤ 8) holds
  codes in ``[−(2^(b−1)−1), 2^(b−1)−1]``: widths below 8 bits are carried as clipped int8 ranges;
* input activations: ``Clip`` to the b-bit code range times the scale, then a per-tensor
  ``QuantizeLinear`` → ``DequantizeLinear`` (uint8 for unsigned inputs, int8 for signed);
* tensors at 16 or 32 bits have no int8 form: weights are stored as their quantized float values and
  activations pass through in float (their fake-quant error is below 1e-4 of the range).

ONNX Runtime then computes what the fake-quant PyTorch model computes: the quantized values
exactly (CGMQ computes a code as QuantizeLinear does, ``x / scale`` rounded half to even), the
layers' float arithmetic up to summation order. The per-layer bit widths are stored in the
model's ``metadata_props`` under ``mmsparse_cgmq_bits`` (JSON).

Detectors go through the same mmdeploy end-to-end export as the other methods
(:func:`export_qdq_detector`: the CGMQ model itself, in QDQ mode, instead of a folded plain model).
In a deep quantized network ORT and PyTorch drift apart by whole quantization steps: their float
convolutions differ in the last bits (summation order), a value that sits that close to a rounding
boundary takes the neighbouring code, and the step propagates. The QDQ graph is therefore checked
layer by layer on ORT's own intermediate values (:func:`qdq_parity`), where it must agree exactly.
"""
import contextlib
import copy
import json
import os.path as osp
import time
from dataclasses import dataclass, field
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import numpy as np
import torch
from mmengine.config import Config
from mmengine.utils import mkdir_or_exist
from torch import nn

from ..core.spec import QuantizedLayer
from ..utils import unwrap
from .fold import build_model, load_source_checkpoint
from .onnx import ExportResult, default_deploy_config, deploy_config_path, mmdeploy_compat
from .plain_config import plain_config

META_KEY = 'mmsparse_cgmq_bits'
_COMPUTE_OPS = ('Conv', 'Gemm', 'MatMul')
_QDQ_WEIGHT_SUFFIX = '.' + QuantizedLayer.QDQ_WEIGHT  # the parameter prepare_qdq adds


def quantized_layers(model: nn.Module) -> List[Tuple[str, QuantizedLayer]]:
    """Every layer of ``model`` (unwrapped from DDP) whose export carries Q/DQ pairs."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, QuantizedLayer)]


@contextlib.contextmanager
def qdq_export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch every quantized layer of ``model`` to its QDQ forward (and eval mode) inside the
    block."""
    model = unwrap(model)
    layers = [layer for _, layer in quantized_layers(model)]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for layer in layers:
        layer.prepare_qdq()
        layer.qdq_export = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.qdq_export = False
            layer.release_qdq()
        for m, mode in modes.items():
            m.training = mode


def bit_report(model: nn.Module) -> List[dict]:
    """Per-layer bit widths and how each tensor is carried in the QDQ ONNX."""
    rows = []
    for name, layer in quantized_layers(model):
        grid = layer.fold_spec().pattern
        signed = grid.act_signed
        rows.append(dict(
            layer=name, bits_w=grid.bits_w, bits_a=grid.bits_a, act_signed=signed,
            weight_onnx='int8 per-channel QDQ' if grid.bits_w <= 8 else 'float (>8 bits)',
            act_onnx=('float (not quantized)' if not layer.quantizes_input else
                      f'{"int8" if signed else "uint8"} per-tensor QDQ' if grid.bits_a <= 8 else
                      'float (>8 bits)'),
            macs=getattr(layer, 'macs', None)))
    return rows


def export_qdq(model: nn.Module, example_inputs: Union[torch.Tensor, Tuple[torch.Tensor, ...]],
               path: str, opset: int = 13, input_names: Optional[Sequence[str]] = None,
               output_names: Optional[Sequence[str]] = None,
               dynamic_axes: Optional[Dict] = None) -> List[dict]:
    """Export ``model`` (with CGMQ layers) to a QDQ ONNX file at ``path``; return :func:`bit_report`.

    Args:
        model (nn.Module): A model whose quantized layers are CGMQ layers.
        example_inputs (Tensor | tuple): Inputs for tracing.
        path (str): Output ``.onnx`` file.
        opset (int): ONNX opset, at least 13 (per-channel QuantizeLinear). Defaults to 13.
        input_names, output_names, dynamic_axes: Passed to ``torch.onnx.export``.

    Raises:
        ValueError: ``opset < 13`` or no CGMQ layer in the model.
    """
    if opset < 13:
        raise ValueError(f'per-channel QuantizeLinear needs opset >= 13, got {opset}')
    if not quantized_layers(model):
        raise ValueError('export_qdq: the model has no quantized layer')
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs, )
    with qdq_export_mode(model) as plain:
        torch.onnx.export(plain, example_inputs, path, opset_version=opset, dynamo=False,
                          input_names=list(input_names) if input_names else None,
                          output_names=list(output_names) if output_names else None,
                          dynamic_axes=dynamic_axes, do_constant_folding=False)
    return _store_bit_report(model, path)


def _store_bit_report(model: nn.Module, path: str) -> List[dict]:
    """Write :func:`bit_report` into the ``metadata_props`` of the ONNX file; return it."""
    import onnx
    report = bit_report(model)
    proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key = META_KEY
    entry.value = json.dumps(report)
    onnx.save(proto, path)
    return report


# ------------------------------------------------------------------------------- detectors ---

@dataclass
class QDQExportResult(ExportResult):
    """What :func:`export_qdq_detector` produced, and the configs to run the ONNX file with."""

    bits: List[dict] = field(default_factory=list)
    deploy_cfg: Optional[Config] = None
    model_cfg: Optional[Config] = None


def qdq_deploy_config(model_cfg: Config, deploy_cfg: Union[str, Config, None] = None,
                      opset: int = 13) -> Tuple[Config, Config]:
    """``(deploy config at opset >= 13, plain model config)`` to export and run a CGMQ detector.

    The plain config (:func:`~mmsparse.export.plain_config`) gives mmdeploy's task processor the
    data pipeline and the ORT backend model; the deploy config defaults to the shipped onnxruntime
    config for the task, with its opset raised to ``opset``.

    Raises:
        ValueError: ``opset < 13`` (per-channel QuantizeLinear needs opset 13).
    """
    from mmdeploy.utils import load_config
    if opset < 13:
        raise ValueError(f'per-channel QuantizeLinear needs opset >= 13, got {opset}')
    plain = plain_config(model_cfg)
    if deploy_cfg is None:
        deploy_cfg = default_deploy_config(plain)
    elif isinstance(deploy_cfg, str):
        deploy_cfg = deploy_config_path(deploy_cfg)
    deploy_cfg, plain = load_config(copy.deepcopy(deploy_cfg), plain)
    deploy_cfg.onnx_config.opset_version = opset
    return deploy_cfg, plain


def export_qdq_detector(config: Union[str, Config], checkpoint: str, work_dir: str, image: Any,
                        deploy_cfg: Union[str, Config, None] = None, opset: int = 13,
                        save_file: str = 'end2end.onnx',
                        cfg_options: Optional[dict] = None) -> QDQExportResult:
    """Export a CGMQ detector end to end (mmdeploy) to ONNX with QuantizeLinear/DequantizeLinear.

    The deployment path of the other methods, with the CGMQ model in place of the folded plain
    model: mmdeploy's ``torch2onnx`` builds the model from the (plain) config itself, so this runs
    its steps on the CGMQ model (built from ``config``, loaded from ``checkpoint``) held in
    :func:`qdq_export_mode`, under :func:`~mmsparse.export.mmdeploy_compat`.

    Args:
        config (str | Config): The mmsparse CGMQ config the checkpoint was trained with.
        checkpoint (str): The CGMQ checkpoint (not folded: activation ranges and gates are needed).
        work_dir (str): Output directory.
        image (str | np.ndarray): A sample image used for tracing.
        deploy_cfg (str | Config, optional): mmdeploy deploy config (a name resolves in
            ``configs/deploy/``). Defaults to the shipped dynamic onnxruntime config for the task.
        opset (int): ONNX opset, at least 13. Defaults to 13.
        save_file (str): ONNX file name inside ``work_dir``. Defaults to ``'end2end.onnx'``.
        cfg_options (dict, optional): Overrides merged into the config. Defaults to None.

    Raises:
        RuntimeError: the checkpoint misses keys of the model (e.g. a layer's gates).
    """
    from mmdeploy.apis.core.pipeline_manager import no_mp
    from mmdeploy.apis.onnx import export
    from mmdeploy.apis.utils import build_task_processor
    from mmdeploy.utils import get_backend, get_dynamic_axes, get_input_shape, get_ir_config
    cfg = Config.fromfile(config) if isinstance(config, str) else copy.deepcopy(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    deploy_cfg, plain = qdq_deploy_config(cfg, deploy_cfg, opset)
    model = build_model(cfg)
    load_source_checkpoint(model, checkpoint)
    processor = build_task_processor(plain, deploy_cfg, 'cpu')
    data, inputs = processor.create_input(image, get_input_shape(deploy_cfg),
                                          data_preprocessor=model.data_preprocessor)
    if isinstance(inputs, list) and len(inputs) == 1:
        inputs = inputs[0]
    ir_cfg = get_ir_config(deploy_cfg)
    names = ir_cfg['input_names'] + ir_cfg['output_names']
    mkdir_or_exist(work_dir)
    prefix = osp.join(work_dir, osp.splitext(save_file)[0])
    start = time.perf_counter()
    with mmdeploy_compat(), qdq_export_mode(model), no_mp():
        export(model, inputs, prefix, backend=get_backend(deploy_cfg).value,
               input_metas=dict(data_samples=data['data_samples'], mode='predict'),
               context_info=dict(deploy_cfg=deploy_cfg), input_names=ir_cfg['input_names'],
               output_names=ir_cfg['output_names'], opset_version=opset,
               dynamic_axes=get_dynamic_axes(deploy_cfg, names),
               keep_initializers_as_inputs=ir_cfg.get('keep_initializers_as_inputs', False),
               optimize=ir_cfg.get('optimize', False))
    seconds = time.perf_counter() - start
    path = prefix + '.onnx'
    bits = _store_bit_report(model, path)
    return QDQExportResult(path, seconds, osp.getsize(path), bits, deploy_cfg, plain)


# ----------------------------------------------------------------------- graph check, parity ---

@dataclass
class QDQTensor:
    """One QuantizeLinear → DequantizeLinear pair of a CGMQ layer in an exported graph."""

    layer: str                # the CGMQ layer (module name)
    kind: str                 # 'weight' or 'act'
    source: str               # tensor entering QuantizeLinear
    output: str               # tensor the layer's Conv / Gemm / MatMul reads (after the Clip)
    layer_outputs: Tuple[str, ...]  # outputs of the Conv / Gemm / MatMul nodes reading it


def _initializer_names(graph) -> set:
    names = {i.name for i in graph.initializer}
    names |= {n.output[0] for n in graph.node if n.op_type == 'Constant'}
    return names


def qdq_tensors(onnx_file: str) -> List[QDQTensor]:
    """Every Q/DQ pair of an exported CGMQ graph, mapped to its layer through the graph edges.

    A weight pair quantizes the initializer ``<layer>.<QuantizedLayer.QDQ_WEIGHT>``; an activation
    pair feeds (after an optional Clip) a Conv / Gemm / MatMul whose weight is that layer's
    (directly, or through its own Q/DQ pair or a Transpose).

    Raises:
        ValueError: a QuantizeLinear is not followed by exactly one DequantizeLinear, or feeds no
            CGMQ layer.
    """
    import onnx
    graph = onnx.load(onnx_file, load_external_data=False).graph
    consts = _initializer_names(graph)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: Dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def weight_layer(name: str) -> Optional[str]:
        node = producer.get(name)
        while node is not None and node.op_type in ('DequantizeLinear', 'QuantizeLinear',
                                                    'Transpose'):
            name = node.input[0]
            node = producer.get(name)
        if name in consts and name.endswith(_QDQ_WEIGHT_SUFFIX):
            return name[:-len(_QDQ_WEIGHT_SUFFIX)]
        return None

    tensors = []
    for node in graph.node:
        if node.op_type != 'QuantizeLinear':
            continue
        dqs = consumers.get(node.output[0], [])
        if len(dqs) != 1 or dqs[0].op_type != 'DequantizeLinear':
            raise ValueError(f'{node.name}: QuantizeLinear must feed exactly one DequantizeLinear')
        output = dqs[0].output[0]
        nxt = consumers.get(output, [])
        if len(nxt) == 1 and nxt[0].op_type == 'Clip':
            output = nxt[0].output[0]
        readers = [n for n in consumers.get(output, []) if n.op_type in _COMPUTE_OPS]
        source = node.input[0]
        if source in consts:
            kind, layer = 'weight', weight_layer(source)
        else:
            kind = 'act'
            layers = {weight_layer(n.input[1]) for n in readers if len(n.input) > 1}
            layer = layers.pop() if len(layers) == 1 else None
        if layer is None or not readers:
            raise ValueError(f'{node.name}: QuantizeLinear of {source!r} feeds no CGMQ layer')
        tensors.append(QDQTensor(layer, kind, source, output,
                                 tuple(n.output[0] for n in readers)))
    return tensors


def check_qdq_graph(onnx_file: str,
                    model: nn.Module) -> Tuple[Dict[str, Dict[str, int]], List[str]]:
    """Count the Q/DQ pairs per layer and check them against the model's bit widths.

    Expected: one weight pair for every weight of at most 8 bits (a layer called several times, e.g.
    an RPN head over the FPN levels, shares it), at least one activation pair for every quantized
    input of at most 8 bits (one per call), and none for 16/32-bit tensors (carried in float).

    Returns:
        tuple: ``({layer: {'weight': pairs, 'act': pairs}}, problems)``, ``problems`` empty when the
        graph matches the model.
    """
    counts: Dict[str, Dict[str, int]] = {}
    for t in qdq_tensors(onnx_file):
        counts.setdefault(t.layer, dict(weight=0, act=0))[t.kind] += 1
    problems = []
    layers = dict(quantized_layers(model))
    for name in sorted(set(counts) - set(layers)):
        problems.append(f'{name}: Q/DQ pairs for a layer the model does not have')
    for name, layer in layers.items():
        grid = layer.fold_spec().pattern
        got = counts.get(name, dict(weight=0, act=0))
        want_w = 1 if grid.bits_w <= 8 else 0
        if got['weight'] != want_w:
            problems.append(f'{name}: {got["weight"]} weight Q/DQ pair(s) for a {grid.bits_w}-bit '
                            f'weight, expected {want_w}')
        quant_act = layer.quantizes_input and grid.bits_a <= 8
        if quant_act != (got['act'] > 0):
            problems.append(f'{name}: {got["act"]} activation Q/DQ pair(s) for a '
                            f'{grid.bits_a}-bit input')
    return counts, problems


def ort_session(onnx_file: str, outputs: Sequence[str] = ()):
    """An ONNX Runtime session (CPU, default optimizations) of ``onnx_file`` that can also return
    the intermediate tensors named in ``outputs`` (they are added as graph outputs)."""
    import onnx
    import onnxruntime as ort
    proto = onnx.load(onnx_file)
    present = {o.name for o in proto.graph.output}
    for name in dict.fromkeys(outputs):
        if name not in present:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return ort.InferenceSession(proto.SerializeToString(), providers=['CPUExecutionProvider'])


@torch.no_grad()
def qdq_parity(onnx_file: str, model: nn.Module,
               feeds: Iterable[Mapping[str, np.ndarray]]) -> List[dict]:
    """Each Q/DQ pair in ONNX Runtime against the CGMQ layer's fake quantization of the same values.

    Activations: the tensor entering QuantizeLinear is taken from the ORT run itself and quantized
    by the layer in PyTorch (``quant_input``), so every layer is checked on its real inputs without
    the drift that accumulates over the network (see the module docstring). Weights: the
    dequantized initializer against the layer's :meth:`folded_weight`.

    Args:
        onnx_file (str): A graph exported in :func:`qdq_export_mode`.
        model (nn.Module): The CGMQ model it was exported from, in eval mode.
        feeds (Iterable[dict]): ORT inputs, e.g. ``[{'input': batch}, ...]``.

    Returns:
        list[dict]: one row per pair, over all feeds: ``layer``, ``kind``, ``numel`` (values
        compared), ``max_abs_diff``, ``max_diff_steps`` (in units of the grid step) and
        ``mismatches`` (values more than half a step apart, i.e. a different integer code;
        expected: none).
    """
    tensors = qdq_tensors(onnx_file)
    names = [t.output for t in tensors] + [t.source for t in tensors if t.kind == 'act']
    session = ort_session(onnx_file, names)
    layers = dict(quantized_layers(model))
    grids = {name: layer.fold_spec().pattern for name, layer in layers.items()}
    rows = [dict(layer=t.layer, kind=t.kind, numel=0, max_abs_diff=0.0, max_diff_steps=0.0,
                 mismatches=0) for t in tensors]
    for i, feed in enumerate(feeds):
        values = dict(zip(names, session.run(names, dict(feed))))
        for t, row in zip(tensors, rows):
            if t.kind == 'weight' and i > 0:
                continue  # constant
            layer, grid = layers[t.layer], grids[t.layer]
            got = torch.from_numpy(np.ascontiguousarray(values[t.output])).float()
            if t.kind == 'weight':
                ref = layer.folded_weight().float().cpu()
                step = torch.tensor(grid.weight_scale).view(-1, *([1] * (ref.dim() - 1)))
            else:
                ref = layer.quant_input(torch.from_numpy(np.ascontiguousarray(values[t.source])))
                step = torch.tensor(grid.act_scale)
            diff = (got - ref).abs()
            steps = diff / step
            row['numel'] += diff.numel()
            row['max_abs_diff'] = max(row['max_abs_diff'], float(diff.max()))
            row['max_diff_steps'] = max(row['max_diff_steps'], float(steps.max()))
            row['mismatches'] += int((steps > 0.5).sum())
    return rows


def qdq_parity_on_dataset(onnx_file: str, model: nn.Module, cfg: Config,
                          dataloader: Optional[dict] = None) -> dict:
    """:func:`qdq_parity` over the config's test split (each batch through the model's data
    preprocessor), summarised.

    Returns:
        dict: ``images``, ``numel`` (values compared), ``mismatches`` and ``mismatch_rate``
        (values a code apart), ``act_max_diff_steps`` / ``weight_max_diff_steps`` (worst
        difference in grid steps) and ``layers_with_mismatches``.
    """
    import onnx
    from .evaluate import _test_dataloader
    input_name = onnx.load(onnx_file, load_external_data=False).graph.input[0].name
    batches = [model.data_preprocessor(data, False)['inputs'].cpu().numpy()
               for data in _test_dataloader(cfg, dataloader)]
    rows = qdq_parity(onnx_file, model, ({input_name: batch} for batch in batches))
    summary = dict(images=sum(b.shape[0] for b in batches),
                   numel=sum(r['numel'] for r in rows),
                   mismatches=sum(r['mismatches'] for r in rows),
                   layers_with_mismatches=sorted({r['layer'] for r in rows if r['mismatches']}))
    for kind in ('act', 'weight'):
        summary[f'{kind}_max_diff_steps'] = max(
            (r['max_diff_steps'] for r in rows if r['kind'] == kind), default=0.0)
    summary['mismatch_rate'] = summary['mismatches'] / max(summary['numel'], 1)
    return summary
