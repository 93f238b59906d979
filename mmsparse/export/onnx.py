"""ONNX export through mmdeploy 1.3.1's Python API, in-process, on the pinned (newer) torch.

mmdeploy 1.3.1 predates torch 2.9; three things break, and :func:`mmdeploy_compat` fixes them for the
duration of a ``with`` block only (every patch is undone on exit, nothing in site-packages changes):

1. ``torch.onnx.export`` defaults to the dynamo exporter on torch >= 2.9, which bypasses mmdeploy's
   TorchScript-level rewriters (and asks for onnxscript). Inside the block ``export`` defaults to
   ``dynamo=False``; an explicit ``dynamo=`` argument is respected.
2. mmdeploy's RoIAlign symbolic (``mmdeploy/mmcv/ops/roi_align.py``, used for every RoI head on the
   onnxruntime backend) imports ``_cast_Long`` from ``torch.onnx.symbolic_opset9``, which torch
   removed. Inside the block it exists again: an ONNX ``Cast`` to INT64, what it always emitted.
3. (not a patch) mmdeploy's ``tools/deploy.py`` runs the export in a spawned subprocess where these
   fixes do not exist, so :func:`export_onnx` drives ``mmdeploy.apis.torch2onnx`` in this process.

Custom ops: on the onnxruntime backend mmdeploy exports RoIAlign as the standard ONNX ``RoiAlign``
and NMS as ``NonMaxSuppression``, so Mask R-CNN, Faster R-CNN and RetinaNet graphs use no
``mmdeploy::`` op. mmdeploy's ORT wrapper nonetheless loads its bundled ``libonnxruntime.so.1.15.1``
and ``libmmdeploy_onnxruntime_ops.so`` (built for ORT 1.15) into the process whenever the file exists.
:func:`build_ort_model` keeps that only for graphs that need a custom op (:func:`custom_op_domains`)
and otherwise runs the stock onnxruntime session alone.
"""
import contextlib
import os.path as osp
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine.config import Config

from ..core.report import verify_state_dict
from ..core.spec import FoldSpec

DEPLOY_CONFIG_DIR = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))),
                             'configs', 'deploy')
_STANDARD_DOMAINS = ('', 'ai.onnx', 'ai.onnx.ml')


def _cast_long(g, input, non_blocking):  # noqa: A002  (torch's symbolic signature)
    """The removed ``torch.onnx.symbolic_opset9._cast_Long``: ONNX Cast to INT64."""
    return g.op('Cast', input, to_i=torch._C._onnx.TensorProtoDataType.INT64)


@contextlib.contextmanager
def mmdeploy_compat() -> Iterator[None]:
    """Make mmdeploy 1.3.1's exporter work on the installed torch, within the block only.

    Note:
        The patches are process-global while the block runs (``torch.onnx.export`` and a module
        attribute); do not export from several threads at once.
    """
    import torch.onnx
    import torch.onnx.symbolic_opset9 as opset9
    original_export = torch.onnx.export
    had_cast_long = hasattr(opset9, '_cast_Long')

    def export(*args, **kwargs):
        kwargs.setdefault('dynamo', False)
        return original_export(*args, **kwargs)

    export.__wrapped__ = original_export
    torch.onnx.export = export
    if not had_cast_long:
        opset9._cast_Long = _cast_long
    try:
        yield
    finally:
        torch.onnx.export = original_export
        if not had_cast_long:
            del opset9._cast_Long


def deploy_config_path(name: str) -> str:
    """Resolve ``name`` to a deploy config: an existing path, or a file in ``configs/deploy/``."""
    if osp.isfile(name):
        return name
    candidate = osp.join(DEPLOY_CONFIG_DIR, name if name.endswith('.py') else name + '.py')
    if osp.isfile(candidate):
        return candidate
    raise FileNotFoundError(f'deploy config {name!r} not found (looked in {DEPLOY_CONFIG_DIR})')


def default_deploy_config(model_cfg: Config, dynamic: bool = True) -> str:
    """The shipped onnxruntime deploy config for a model: instance-seg if it has a mask head."""
    roi_head = model_cfg.model.get('roi_head') or {}
    task = 'instance-seg' if roi_head.get('mask_head') else 'detection'
    return deploy_config_path(f'{task}_onnxruntime_{"dynamic" if dynamic else "static-256x256"}')


def _load(deploy_cfg: Union[str, Config], model_cfg: Union[str, Config]) -> Tuple[Config, Config]:
    from mmdeploy.utils import load_config
    if isinstance(deploy_cfg, str):
        deploy_cfg = deploy_config_path(deploy_cfg)
    return tuple(load_config(deploy_cfg, model_cfg))


@dataclass
class ExportResult:
    """What :func:`export_onnx` produced."""

    onnx_file: str
    seconds: float
    size_bytes: int


def first_test_image(cfg: Config) -> str:
    """Path of the first image of ``cfg``'s test split: the default tracing input of the exports."""
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    return DATASETS.build(cfg.test_dataloader.dataset).get_data_info(0)['img_path']


def export_onnx(model_cfg: Union[str, Config], checkpoint: str, work_dir: str, image: Any,
                deploy_cfg: Union[str, Config, None] = None, save_file: str = 'end2end.onnx',
                device: str = 'cpu') -> ExportResult:
    """Export a (folded, plain mmdet) detector to ONNX with mmdeploy, in this process.

    Args:
        model_cfg (str | Config): The model config (the plain config written by fold).
        checkpoint (str): The (folded) checkpoint.
        work_dir (str): Output directory.
        image (str | np.ndarray): A sample image used for tracing.
        deploy_cfg (str | Config, optional): mmdeploy deploy config; a name resolves in
            ``configs/deploy/``. Defaults to the shipped dynamic onnxruntime config for the task.
        save_file (str): ONNX file name inside ``work_dir``. Defaults to ``'end2end.onnx'``.
        device (str): Defaults to ``'cpu'``.
    """
    from mmdeploy.apis import torch2onnx
    if isinstance(model_cfg, str):
        model_cfg = Config.fromfile(model_cfg)
    if deploy_cfg is None:
        deploy_cfg = default_deploy_config(model_cfg)
    deploy_cfg, model_cfg = _load(deploy_cfg, model_cfg)
    start = time.perf_counter()
    with mmdeploy_compat():
        torch2onnx(image, work_dir, save_file, deploy_cfg, model_cfg, checkpoint, device)
    seconds = time.perf_counter() - start
    path = osp.join(work_dir, save_file)
    return ExportResult(path, seconds, osp.getsize(path))


def custom_op_domains(onnx_file: str) -> List[str]:
    """Non-standard op domains used by an ONNX graph (e.g. ``['mmdeploy']``), sorted."""
    import onnx
    model = onnx.load(onnx_file, load_external_data=False)
    return sorted({n.domain for n in model.graph.node if n.domain not in _STANDARD_DOMAINS})


@contextlib.contextmanager
def _without_ort_custom_ops() -> Iterator[None]:
    """Make mmdeploy's ORT wrapper skip its custom-ops library (and the bundled ORT 1.15 runtime)."""
    from mmdeploy.backend.onnxruntime import wrapper
    original = wrapper.get_ops_path
    wrapper.get_ops_path = lambda: ''
    try:
        yield
    finally:
        wrapper.get_ops_path = original


def build_task_processor(model_cfg: Union[str, Config], deploy_cfg: Union[str, Config, None] = None,
                         device: str = 'cpu'):
    """mmdeploy's task processor for a model config and deploy config (names resolve as above)."""
    from mmdeploy.apis.utils import build_task_processor as _build
    if isinstance(model_cfg, str):
        model_cfg = Config.fromfile(model_cfg)
    if deploy_cfg is None:
        deploy_cfg = default_deploy_config(model_cfg)
    deploy_cfg, model_cfg = _load(deploy_cfg, model_cfg)
    return _build(model_cfg, deploy_cfg, device)


def build_ort_model(task_processor, onnx_file: str):
    """mmdeploy's ONNX Runtime backend model; loads mmdeploy's custom ops only if the graph needs them."""
    domains = custom_op_domains(onnx_file)
    context = contextlib.nullcontext() if domains else _without_ort_custom_ops()
    with context:
        return task_processor.build_backend_model([onnx_file])


# ------------------------------------------------------------------------- pattern verification ---

def _node_module(node_name: str) -> Optional[str]:
    """Module path from a TorchScript-exported node name (``/backbone/layer1/layer1.0/conv1/Conv``)."""
    parts = [p for p in node_name.split('/') if p][:-1]
    if not parts:
        return None
    names: List[str] = []
    for part in parts:
        part = re.sub(r'_\d+$', '', part)  # repeated calls: rpn_cls_1
        if names and part.startswith(names[-1] + '.'):
            names[-1] = part       # 'layer1' then 'layer1.0' -> 'layer1.0'
        else:
            names.append(part)
    return '.'.join(names)


def _match_layer(candidate: str, layers: Sequence[str]) -> Optional[str]:
    if candidate in layers:
        return candidate
    hits = [name for name in layers if name.endswith('.' + candidate)]
    return hits[0] if len(hits) == 1 else None


def node_layer(node, layers: Sequence[str]) -> Optional[str]:
    """The layer of ``layers`` whose weight an ONNX ``Conv`` / ``Gemm`` / ``MatMul`` node reads.

    By the weight's name (``<layer>.weight``) or, for weights the exporter renamed (convolutions
    with batch norm folded in: ``onnx::Conv_2112``), by the node's scope name; None if neither names
    exactly one layer.
    """
    name = node.input[1]
    if name.endswith('.weight') and name[:-len('.weight')] in layers:
        return name[:-len('.weight')]
    candidate = _node_module(node.name)
    return _match_layer(candidate, layers) if candidate else None


def onnx_layer_weights(onnx_file: str, layers: Sequence[str]) -> Dict[str, List[np.ndarray]]:
    """Weights of ``layers`` as stored in the ONNX graph, in torch layout ((O, I, kh, kw) / (O, I)).

    A weight initializer (or Constant) is mapped to a layer by its name (``<layer>.weight``) or, for
    weights the exporter renamed (convolutions with batch norm folded in), by the consuming node's
    scope name.
    """
    import onnx
    from onnx import numpy_helper
    model = onnx.load(onnx_file)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:  # weights the exporter turned into Constant nodes
        if node.op_type == 'Constant':
            value = next((a.t for a in node.attribute if a.name == 'value'), None)
            if value is not None:
                inits[node.output[0]] = numpy_helper.to_array(value)
    found: Dict[str, List[np.ndarray]] = {}
    for node in model.graph.node:
        if node.op_type not in ('Conv', 'Gemm', 'MatMul') or len(node.input) < 2:
            continue
        name = node.input[1]
        layer = node_layer(node, layers) if name in inits else None
        if layer is None:
            continue
        array = inits[name]
        if node.op_type == 'MatMul' or (node.op_type == 'Gemm' and not any(
                a.name == 'transB' and a.i == 1 for a in node.attribute)):
            array = array.T  # (I, O) -> (O, I)
        found.setdefault(layer, []).append(array)
    return found


def verify_onnx(onnx_file: str, specs: Mapping[str, FoldSpec]) -> Tuple[list, List[str]]:
    """Check the declared sparsity patterns (N:M, block) on the weights stored in an ONNX graph.

    Every occurrence of a layer's weight (a layer called several times may appear more than once)
    is checked by its pattern. Quantization grids are not checked here: the exporter folds batch
    norm into the convolution weights, which moves them off their grid.

    Returns:
        tuple: ``(violations, missing)``: blocks breaking their pattern, and declared sparse layers
        whose weight was not found in the graph (e.g. a layer the exporter fused beyond recognition).
    """
    checked = {name: spec for name, spec in specs.items() if spec.sparse}
    weights = onnx_layer_weights(onnx_file, list(checked))
    violations: list = []
    for name, arrays in weights.items():
        for array in arrays:
            tensor = torch.from_numpy(np.ascontiguousarray(array))
            violations += verify_state_dict({f'{name}.weight': tensor}, {name: checked[name]})
    return violations, sorted(set(checked) - set(weights))


__all__ = [
    'DEPLOY_CONFIG_DIR', 'ExportResult', 'build_ort_model', 'build_task_processor', 'custom_op_domains',
    'default_deploy_config', 'deploy_config_path', 'export_onnx', 'first_test_image', 'mmdeploy_compat',
    'node_layer', 'onnx_layer_weights', 'verify_onnx'
]
