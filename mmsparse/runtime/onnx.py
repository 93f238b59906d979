"""ONNX Runtime path of the runtime: N:M ``Conv`` / ``Gemm`` nodes of an exported graph as custom nodes.

:func:`rewrite` takes an ONNX graph exported from a folded model (e.g. the ``end2end.onnx`` of
``tools/deploy.py``) and replaces each ``Conv`` (and ``Gemm``) node whose constant weight satisfies its
layer's declared pattern with a node of domain ``ai.onnx.contrib`` that ONNX Runtime runs through
onnxruntime-extensions' PyOp: a Python function calling mmsparse's compiled kernel
(``torch.ops.mmsparse.nm_conv2d`` / ``nm_linear``) on the node's CSR buffers, stored as initializers.
As :func:`mmsparse.runtime.pack` does, each node keeps the faster tactic measured on its real input
(the sparse node, or the plain dense node), recorded in the model's metadata (``mmsparse_runtime``).
Run the result with :func:`inference_session`, which registers the ops.

The pattern is verified on each candidate weight itself (the exporter folds batch norm into conv
weights and renames them; per-output-channel scaling keeps the zeros): a weight breaking it stays a
plain node, reported with the reason.
"""
import copy
import json
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..core.blocks import BlockPattern
from ..core.patterns import NMPattern
from ..export.onnx import node_layer
from .layers import TACTICS, ensure_kernels, to_csr
from .pack import (DEFAULT_CONV_SIZE, DEFAULT_LINEAR_ROWS, RTOL, PatternLike, median_times,
                   relative_error, resolve_patterns)

DOMAIN = 'ai.onnx.contrib'
CONV_OP = 'MMSparseNMConv'
LINEAR_OP = 'MMSparseNMLinear'
META_KEY = 'mmsparse_runtime'
FORMAT = 'mmsparse-ort/1'
#: most kernel positions the sparse conv kernel takes (taps are stored as uint8)
MAX_TAPS = 256

ModelLike = Union[str, bytes, onnx.ModelProto]


@dataclass
class NodeReport:
    """What :func:`rewrite` did with one ``Conv`` / ``Gemm`` node of a declared layer."""

    node: str
    layer: str
    pattern: str
    tactic: Optional[str]           # 'sparse' (custom node) / 'dense' (plain node), None: not eligible
    reason: Optional[str] = None    # why the node stays a plain node without a choice
    dense_ms: Optional[float] = None
    sparse_ms: Optional[float] = None
    relu: bool = False              # the following Relu runs in the custom node

    def __str__(self) -> str:
        if self.tactic is None:
            return f'{self.node} ({self.layer}): {self.pattern}, left plain ({self.reason})'
        timing = ('' if self.dense_ms is None else
                  f' (dense {self.dense_ms:.3f} ms, sparse {self.sparse_ms:.3f} ms)')
        relu = ', relu fused' if self.relu else ''
        return f'{self.node} ({self.layer}): {self.pattern}, tactic {self.tactic}{relu}{timing}'


@dataclass
class RewriteResult:
    """The rewritten graph, one report per node of a declared layer and the declared layers not found."""

    model: onnx.ModelProto
    nodes: List[NodeReport]
    missing: List[str]

    def counts(self) -> Dict[str, int]:
        """Nodes per outcome: ``{'sparse': .., 'dense': .., 'plain': ..}``."""
        return dict(sparse=sum(r.tactic == 'sparse' for r in self.nodes),
                    dense=sum(r.tactic == 'dense' for r in self.nodes),
                    plain=sum(r.tactic is None for r in self.nodes))

    def format(self) -> str:
        """A summary line and one line per node."""
        c = self.counts()
        lines = [f'mmsparse ONNX rewrite: {c["sparse"]} node(s) sparse, {c["dense"]} dense tactic, '
                 f'{c["plain"]} left plain' + (f'; declared layers not in the graph: {self.missing}'
                                               if self.missing else '')]
        return '\n  '.join(lines + [str(r) for r in self.nodes])


# ------------------------------------------------------------------------------------ custom ops ---

def _nm_conv(x, values, channels, taps, row_ptr, bias, **attrs) -> np.ndarray:
    """The custom conv node: mmsparse's kernel on zero-copy views of the node's inputs."""
    t = torch.from_numpy
    out = torch.ops.mmsparse.nm_conv2d(t(x), t(values), t(channels), t(taps), t(row_ptr), t(bias),
                                       attrs['kh'], attrs['kw'], attrs['stride'], attrs['padding'],
                                       attrs['dilation'], bool(attrs['relu']))
    return out.numpy()


def _nm_linear(x, values, channels, row_ptr, bias, **attrs) -> np.ndarray:
    """The custom Gemm node (``x @ W.T + bias``)."""
    t = torch.from_numpy
    out = torch.ops.mmsparse.nm_linear(t(x), t(values), t(channels), t(row_ptr), t(bias))
    return out.relu_().numpy() if attrs['relu'] else out.numpy()


def _invoke(k_id: int, feed, attributes):
    """onnxruntime-extensions' PyOp call hook, returning numeric outputs as arrays.

    The stock hook (``_ocos._on_pyop_invocation``, 0.15.0) hands every output back as a Python list
    (``tolist()``), which costs more than the convolution; the C++ side casts either to an array.
    String outputs keep the list.
    """
    from onnxruntime_extensions._ocos import Opdef
    op = Opdef._odlist[k_id]
    out = op.body(*feed, **op.cast_attributes(attributes))
    res = []
    for array in (out if isinstance(out, tuple) else (out,)):
        res += [array.shape, array.flatten().tolist() if array.dtype == object else array.reshape(-1)]
    return (k_id, *res)


_REGISTERED = False


def register_custom_ops() -> None:
    """Define the custom ops with onnxruntime-extensions (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError as err:
        raise ImportError('the ONNX Runtime path of mmsparse.runtime needs onnxruntime-extensions '
                          '(pinned in requirements/pins.txt; run `bash tools/install.sh`)') from err
    f, i64 = PyCustomOpDef, PyCustomOpDef.dt_int64
    onnx_op(op_type=CONV_OP, inputs=[f.dt_float, f.dt_float, f.dt_int32, f.dt_uint8, f.dt_int64, f.dt_float],
            outputs=[f.dt_float], attrs={k: i64 for k in ('kh', 'kw', 'stride', 'padding', 'dilation',
                                                          'relu')})(_nm_conv)
    onnx_op(op_type=LINEAR_OP, inputs=[f.dt_float, f.dt_float, f.dt_int32, f.dt_int64, f.dt_float],
            outputs=[f.dt_float], attrs={'relu': i64})(_nm_linear)
    PyCustomOpDef.install_hooker(_invoke)
    _REGISTERED = True


def inference_session(model: ModelLike, threads: Optional[int] = None,
                      providers: Sequence[str] = ('CPUExecutionProvider',)):
    """An ``onnxruntime.InferenceSession`` of ``model`` (path, bytes or proto) with mmsparse's ops.

    Args:
        threads (int, optional): ONNX Runtime's intra-op threads. The custom nodes run on torch's
            intra-op threads (``torch.set_num_threads``); set both to the same count.
    """
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path
    register_custom_ops()
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    if threads is not None:
        options.intra_op_num_threads = threads
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=list(providers))


# ------------------------------------------------------------------------------------- rewriting ---

def _constants(graph) -> Dict[str, np.ndarray]:
    """Constant tensors by name: initializers, ``Constant`` nodes and ``Identity`` of either (the
    exporter shares equal tensors, e.g. zero biases, through ``Identity``)."""
    values = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == 'Constant':
            value = next((a.t for a in node.attribute if a.name == 'value'), None)
            if value is not None:
                values[node.output[0]] = value
        elif node.op_type == 'Identity' and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _conv_geometry(node, weight: np.ndarray) -> Tuple[Optional[dict], Optional[str]]:
    """``(kernel attributes, None)`` of a Conv the sparse kernel covers, else ``(None, why not)``."""
    a = _attrs(node)
    if weight.ndim != 4:
        return None, f'{weight.ndim - 2}-D convolution'
    kh, kw = weight.shape[2:]
    auto_pad = a.get('auto_pad', b'NOTSET')
    pads, strides, dilations = (list(a.get(k, [d] * n)) for k, d, n in
                                (('pads', 0, 4), ('strides', 1, 2), ('dilations', 1, 2)))
    problems = [f'group={a["group"]}' if a.get('group', 1) != 1 else None,
                f'auto_pad={auto_pad.decode()}' if auto_pad not in (b'NOTSET', b'') else None,
                f'pads={pads} not all equal' if len(set(pads)) != 1 else None,
                f'strides={strides} not square' if len(set(strides)) != 1 else None,
                f'dilations={dilations} not square' if len(set(dilations)) != 1 else None,
                f'{kh}x{kw} kernel has more than {MAX_TAPS} positions' if kh * kw > MAX_TAPS else None]
    problems = [p for p in problems if p]
    if problems:
        return None, ', '.join(problems)
    return dict(kh=kh, kw=kw, stride=strides[0], padding=pads[0], dilation=dilations[0]), None


def _gemm_problem(node, weight: np.ndarray, bias: Optional[np.ndarray]) -> Optional[str]:
    a = _attrs(node)
    if a.get('transA', 0) != 0 or a.get('transB', 0) != 1 or weight.ndim != 2:
        return 'Gemm is not x @ W.T (transA=0, transB=1)'
    if a.get('alpha', 1.0) != 1.0 or (bias is not None and a.get('beta', 1.0) != 1.0):
        return 'Gemm with alpha or beta != 1'
    if bias is not None and bias.shape != (weight.shape[0],):
        return f'Gemm bias of shape {bias.shape}'
    return None


def _pattern_problem(layer: str, pattern, weight: np.ndarray) -> Optional[str]:
    """Why ``weight`` cannot run sparse under ``pattern`` (None: it satisfies it)."""
    if not isinstance(pattern, (NMPattern, BlockPattern)):
        return f'pattern {pattern} has no sparse kernel'
    if isinstance(pattern, NMPattern) and weight.shape[1] % pattern.m:
        return f'{weight.shape[1]} input channels are no multiple of {pattern.m}'
    violations = pattern.violations(layer, torch.from_numpy(weight))
    return f'weight breaks its pattern: {violations[0]}' if violations else None


@dataclass
class _Candidate:
    node: onnx.NodeProto
    report: NodeReport
    weight: np.ndarray
    bias: Optional[np.ndarray]
    geometry: Optional[dict]    # conv kernel attributes; None for a Gemm
    relu: Optional[onnx.NodeProto] = None

    @property
    def output(self) -> str:
        return (self.relu or self.node).output[0]


def _value_info(name: str):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _opsets(model: onnx.ModelProto) -> List:
    opsets = [o for o in model.opset_import if o.domain != DOMAIN]
    return opsets + [helper.make_opsetid(DOMAIN, 1)]


def _custom_node(cand: _Candidate, input_name: str, prefix: str) -> Tuple[onnx.NodeProto, list]:
    """The custom node replacing ``cand`` (reading ``input_name``) and its CSR initializers."""
    csr = to_csr(torch.from_numpy(np.ascontiguousarray(cand.weight)))
    bias = cand.bias if cand.bias is not None else np.zeros(cand.weight.shape[0], np.float32)
    names = ('values', 'channels', 'taps', 'row_ptr') if cand.geometry else ('values', 'channels', 'row_ptr')
    inits = [numpy_helper.from_array(csr[n].numpy(), f'{prefix}::{n}') for n in names]
    inits.append(numpy_helper.from_array(np.ascontiguousarray(bias, np.float32), f'{prefix}::bias'))
    attrs = dict(cand.geometry or {}, relu=int(cand.relu is not None))
    node = helper.make_node(CONV_OP if cand.geometry else LINEAR_OP, [input_name] + [i.name for i in inits],
                            [cand.output], name=cand.node.name, domain=DOMAIN, **attrs)
    return node, inits


def _single_node_models(cand: _Candidate, opsets) -> Dict[str, onnx.ModelProto]:
    """The node alone, dense (plain node [+ Relu]) and sparse (custom node), input ``x``, output ``y``."""
    node = copy.deepcopy(cand.node)
    weights = [numpy_helper.from_array(cand.weight, node.input[1])]
    if cand.bias is not None:
        weights.append(numpy_helper.from_array(cand.bias, node.input[2]))
    node.input[0] = 'x'
    nodes = [node]
    if cand.relu is not None:
        nodes.append(helper.make_node('Relu', [node.output[0]], ['y']))
    else:
        node.output[0] = 'y'
    sparse, inits = _custom_node(cand, 'x', 'w')
    sparse.output[0] = 'y'
    graphs = dict(dense=helper.make_graph(nodes, 'dense', [_value_info('x')], [_value_info('y')], weights),
                  sparse=helper.make_graph([sparse], 'sparse', [_value_info('x')], [_value_info('y')], inits))
    return {k: helper.make_model(g, opset_imports=opsets) for k, g in graphs.items()}


def _default_input(cand: _Candidate) -> np.ndarray:
    gen = np.random.default_rng(0)
    if cand.geometry is None:
        return gen.standard_normal((DEFAULT_LINEAR_ROWS, cand.weight.shape[1]), np.float32)
    g = cand.geometry
    size = max(DEFAULT_CONV_SIZE, g['dilation'] * (max(g['kh'], g['kw']) - 1) + 1)
    return gen.standard_normal((1, cand.weight.shape[1], size, size), np.float32)


def _capture(model: onnx.ModelProto, names: List[str], feeds: Mapping[str, np.ndarray],
             threads: Optional[int]) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """``({tensor name: value}, {graph output: value})`` of one run of the original ``model``."""
    probe = copy.deepcopy(model)
    outputs = [o.name for o in probe.graph.output]
    probe.graph.output.extend(_value_info(n) for n in names if n not in outputs)
    session = inference_session(probe, threads)
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, dict(feeds))))
    return values, {n: values[n] for n in outputs}


def rewrite(model: ModelLike,
            patterns: Optional[Mapping[str, PatternLike]] = None,
            checkpoint: Optional[Union[str, dict]] = None,
            tactic: Union[str, Mapping[str, str]] = 'auto',
            example_inputs: Optional[Mapping[str, np.ndarray]] = None,
            repeats: int = 5,
            threads: Optional[int] = None,
            check_outputs: bool = True) -> RewriteResult:
    """Replace the ``Conv`` / ``Gemm`` nodes of declared sparse layers by mmsparse's custom nodes.

    Args:
        model (str | bytes | ModelProto): The exported graph (not modified; a copy is rewritten).
        patterns (Mapping, optional): ``{layer: '1:16' | NMPattern | BlockPattern | FoldSpec}``,
            module names of the exported model. Defaults to the fold meta of ``checkpoint``.
        checkpoint (str | dict, optional): Folded checkpoint (or its path) giving the patterns.
        tactic (str | Mapping): ``'auto'`` (time the custom node against the plain node on the
            node's input, keep the faster), ``'sparse'`` or ``'dense'``, for all nodes or per node
            name ``{node: tactic}`` (``'auto'`` for the others).
        example_inputs (Mapping, optional): Graph inputs ``{name: array}``. The original graph runs on
            them once to capture each node's real input (for the check and the timing) and, with
            ``check_outputs``, the rewritten graph must give its outputs. Without them nodes are
            checked and timed on ``(1, C, 56, 56)`` (``Gemm``: ``(512, C)``) random inputs.
        repeats (int): Timed repetitions per tactic for ``'auto'`` (median). Defaults to 5.
        threads (int, optional): ONNX Runtime intra-op threads of the sessions used here.
        check_outputs (bool): Compare the graph outputs on ``example_inputs`` (relative error at
            most ``RTOL``). Turn it off for graphs whose output sizes depend on near-ties (detectors:
            top-k, NMS); every custom node is still checked against the plain node on its input.

    Returns:
        RewriteResult: the rewritten model (its ``metadata_props['mmsparse_runtime']`` records the
        format, every node's layer, pattern, tactic, timings or reason), reports, missing layers.

    Raises:
        ValueError: no patterns, a bad tactic, a custom node off its plain node by more than ``RTOL``
            (relative), or (``check_outputs``) rewritten graph outputs off the original.
    """
    specs = resolve_patterns(patterns, checkpoint)
    forced = tactic if isinstance(tactic, Mapping) else {}
    bad = {k: v for k, v in ({'*': tactic} if isinstance(tactic, str) else forced).items()
           if v not in TACTICS + ('auto',)}
    if bad:
        raise ValueError(f'bad tactics {bad} (use "auto", "sparse" or "dense")')
    model = onnx.load_from_string(model) if isinstance(model, bytes) else (
        onnx.load(model) if isinstance(model, str) else copy.deepcopy(model))
    graph = model.graph
    inits = _constants(graph)
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    layers = list(specs)

    reports, candidates, found = [], [], set()
    for node in graph.node:
        if node.op_type not in ('Conv', 'Gemm', 'MatMul') or len(node.input) < 2:
            continue
        layer = node_layer(node, layers)
        if layer is None:
            continue
        found.add(layer)
        report = NodeReport(node.name, layer, str(specs[layer]), None)
        reports.append(report)
        weight = numpy_helper.to_array(inits[node.input[1]]).copy() if node.input[1] in inits else None
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        bias = numpy_helper.to_array(inits[bias_name]) if bias_name in inits else None
        geometry = None
        if node.op_type == 'MatMul':
            report.reason = 'MatMul is not rewritten'
        elif weight is None or weight.dtype != np.float32 or (bias_name and bias is None):
            report.reason = 'weight or bias is no float32 constant'
        elif node.op_type == 'Conv':
            geometry, report.reason = _conv_geometry(node, weight)
        else:
            report.reason = _gemm_problem(node, weight, bias)
        report.reason = report.reason or _pattern_problem(layer, specs[layer], weight)
        if report.reason is None:
            after = consumers.get(node.output[0], [])
            relu = after[0] if (len(after) == 1 and after[0].op_type == 'Relu'
                                and node.output[0] not in graph_outputs) else None
            candidates.append(_Candidate(node, report, weight, bias, geometry, relu))
    unknown = [name for name in forced if name not in {c.node.name for c in candidates}]
    if unknown:
        raise ValueError(f'tactic given for node(s) that are no rewrite candidates: {", ".join(unknown)}')
    tactic_of = {c.node.name: tactic if isinstance(tactic, str) else forced.get(c.node.name, 'auto')
                 for c in candidates}
    if any(t != 'dense' for t in tactic_of.values()):
        ensure_kernels()
    register_custom_ops()

    captured, reference = {}, None
    if example_inputs is not None:
        captured, reference = _capture(model, [c.node.input[0] for c in candidates], example_inputs,
                                       threads)
    opsets = _opsets(model)
    replacements, new_inits = {}, {}
    for cand in candidates:
        chosen = tactic_of[cand.node.name]
        cand.report.tactic = chosen
        if chosen == 'dense':
            continue
        x = captured.get(cand.node.input[0])
        x = _default_input(cand) if x is None else x
        sessions = {k: inference_session(m, threads) for k, m in _single_node_models(cand, opsets).items()}
        run = {k: (lambda s: lambda a: s.run(None, {'x': a})[0])(s) for k, s in sessions.items()}
        err = relative_error(torch.from_numpy(run['sparse'](x)), torch.from_numpy(run['dense'](x)))
        if err > RTOL:
            raise ValueError(f'{cand.node.name} ({cand.report.layer}): custom node differs from the plain '
                             f'node by {err:.2e} (relative) > {RTOL}')
        if chosen == 'auto':
            timings = median_times(run, [x], repeats)
            cand.report.dense_ms, cand.report.sparse_ms = timings['dense'] * 1e3, timings['sparse'] * 1e3
            chosen = 'sparse' if timings['sparse'] < timings['dense'] else 'dense'
        cand.report.tactic = chosen
        if chosen == 'sparse':
            cand.report.relu = cand.relu is not None
            # nodes sharing a weight and bias (a head run on every FPN level) share the buffers
            prefix = f'mmsparse::{cand.node.input[1]}::{cand.node.input[2] if cand.bias is not None else ""}'
            node, node_inits = _custom_node(cand, cand.node.input[0], prefix)
            new_inits.update((i.name, i) for i in node_inits)
            replacements[id(cand.node)] = node
            if cand.relu is not None:
                replacements[id(cand.relu)] = None

    nodes = [replacements.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(n for n in nodes if n is not None)
    used = {name for n in graph.node for name in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + list(new_inits.values()))
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    meta = dict(format=FORMAT, nodes={r.node: {k: v for k, v in asdict(r).items() if k != 'node'}
                                      for r in reports})
    props = [p for p in model.metadata_props if p.key != META_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    model.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    result = RewriteResult(model, reports, sorted(name for name, spec in specs.items()
                                                  if name not in found and _is_sparse(spec)))
    if example_inputs is not None and check_outputs:
        _check_outputs(model, reference, example_inputs, threads)
    return result


def _is_sparse(pattern) -> bool:
    return isinstance(pattern, (NMPattern, BlockPattern))


def _check_outputs(model: onnx.ModelProto, reference: Dict[str, np.ndarray],
                   feeds: Mapping[str, np.ndarray], threads: Optional[int]) -> None:
    session = inference_session(model, threads)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, dict(feeds))))
    for name, ref in reference.items():
        if outputs[name].shape != ref.shape:
            raise ValueError(f'rewritten graph output {name} has shape {outputs[name].shape}, the '
                             f'original {ref.shape}')
        err = relative_error(torch.from_numpy(outputs[name]), torch.from_numpy(ref))
        if err > RTOL:
            raise ValueError(f'rewritten graph output {name} differs from the original by {err:.2e} '
                             f'(relative) > {RTOL}')


def node_tactics(model: ModelLike) -> Dict[str, str]:
    """``{node: tactic}`` recorded in a rewritten model (pass it as ``rewrite(..., tactic=)``)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model,
                                                                                        load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise ValueError(f'the model has no {META_KEY!r} metadata: rewrite it first')
    return {node: entry['tactic'] for node, entry in json.loads(props[META_KEY])['nodes'].items()
            if entry['tactic'] is not None}


def with_session(backend_model, session):
    """A copy of mmdeploy's ONNX Runtime backend model running ``session`` instead of its own.

    mmdeploy's wrapper builds its session without mmsparse's ops; this keeps its pre- and
    post-processing and swaps the session (e.g. :func:`inference_session` of a rewritten graph).
    ``backend_model`` itself is left unchanged.
    """
    model = copy.copy(backend_model)
    model._modules = dict(backend_model._modules)  # own submodule table: the original keeps its wrapper
    wrapper = copy.copy(backend_model.wrapper)
    wrapper.sess = session
    wrapper._input_metas = {i.name: i for i in session.get_inputs()}
    wrapper.io_binding = session.io_binding()
    model.wrapper = wrapper
    return model


__all__ = ['CONV_OP', 'DOMAIN', 'LINEAR_OP', 'META_KEY', 'NodeReport', 'RewriteResult', 'inference_session',
           'node_tactics', 'register_custom_ops', 'rewrite', 'with_session']
