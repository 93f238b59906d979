"""ONNX export with QuantizeLinear / DequantizeLinear nodes for models containing CGMQ layers.

In export mode every CGMQ layer emits, through the TorchScript exporter (``dynamo=False``):

* weights: its quantized (folded) weight through a per-output-channel ``QuantizeLinear`` →
  ``DequantizeLinear`` pair (int8, zero point 0, axis 0; opset ≥ 13). A b-bit weight (b ≤ 8) holds
  codes in ``[−(2^(b−1)−1), 2^(b−1)−1]``: widths below 8 bits are carried as clipped int8 ranges;
* input activations: ``Clip`` to the b-bit code range times the scale, then a per-tensor
  ``QuantizeLinear`` → ``DequantizeLinear`` (uint8 for unsigned inputs, int8 for signed);
* tensors at 16 or 32 bits have no int8 form: weights are stored as their quantized float values and
  activations pass through in float (their fake-quant error is below 1e-4 of the range).

ONNX Runtime then computes what the fake-quant PyTorch model computes (up to rounding ties, which
ONNX resolves half-to-even and CGMQ half-toward-zero, and float summation order). The per-layer bit
widths are stored in the model's ``metadata_props`` under ``mmsparse_cgmq_bits`` (JSON).
"""
import contextlib
import json
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..cgmq.bops import cgmq_layers, unwrap

META_KEY = 'mmsparse_cgmq_bits'


@contextlib.contextmanager
def qdq_export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch every CGMQ layer of ``model`` to its QDQ forward (and eval mode) inside the block."""
    model = unwrap(model)
    layers = [layer for _, layer in cgmq_layers(model)]
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
    for name, layer in cgmq_layers(model):
        signed = bool(layer.act_signed)
        rows.append(dict(
            layer=name, bits_w=layer.bits_w, bits_a=layer.bits_a, act_signed=signed,
            weight_onnx='int8 per-channel QDQ' if layer.bits_w <= 8 else 'float (>8 bits)',
            act_onnx=('float (not quantized)' if not layer.quant_act else
                      f'{"int8" if signed else "uint8"} per-tensor QDQ' if layer.bits_a <= 8 else
                      'float (>8 bits)'),
            macs=layer.macs))
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
    if not cgmq_layers(model):
        raise ValueError('export_qdq: the model has no CGMQ layer')
    import onnx
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs, )
    with qdq_export_mode(model) as plain:
        torch.onnx.export(plain, example_inputs, path, opset_version=opset, dynamo=False,
                          input_names=list(input_names) if input_names else None,
                          output_names=list(output_names) if output_names else None,
                          dynamic_axes=dynamic_axes, do_constant_folding=False)
    report = bit_report(model)
    proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key = META_KEY
    entry.value = json.dumps(report)
    onnx.save(proto, path)
    return report
