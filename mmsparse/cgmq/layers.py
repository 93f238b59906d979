"""CGMQ quantized conv and linear layers: learned ranges, nested residual quantizer, gated bit widths.

The layers are the :mod:`mmsparse.core.layers` scaffolds with the CGMQ mixin, so ``weight`` / ``bias``
keys stay stock mmdet keys. Extra state, all created at build time (SPEC §0: before the optimizer is built):

* parameters ``weight_range`` (per output channel by default, else per tensor) and ``act_range``
  (per tensor): the upper clipping bounds β;
* parameters ``weight_gate`` and ``act_gate``: the gate variables ``[g4, g8, g16, g32]``;
* persistent buffers ``act_signed`` (whether the input range is ``[−β, β]`` or ``[0, β]``) and
  ``calibrated`` (ranges were initialised from data; calibration never reruns once set, e.g. on
  resume or when fine-tuning from a CGMQ checkpoint).

Weights are quantized signed and symmetric; the input activation is quantized per tensor, unsigned
when it is non-negative. ``act_signed=None`` (default) lets :class:`~mmsparse.cgmq.CGMQHook`'s
calibration decide from the observed minimum; ``True`` / ``False`` fix it in the config.
"""
from typing import Dict, Iterable, Optional, Tuple

import torch
from mmengine.registry import MODELS
from torch import Tensor, nn

from ..core.layers import CompressedConv2d, CompressedLinear
from ..core.quant import QuantGrid
from ..core.spec import FoldSpec, QuantizedLayer
from .quantizer import (BIT_WIDTHS, bits_from_states, code_range, gate_values_for_bits,
                        nested_quantize, scales)


def _key(tensor: Tensor) -> Tuple[int, int]:
    """Identifies a tensor's current values: its in-place version counter and its storage."""
    return tensor._version, tensor.data_ptr()


class CGMQMixin(QuantizedLayer):
    """Shared CGMQ machinery of :class:`CGMQConv2d` and :class:`CGMQLinear`.

    Attributes:
        macs (int | None): Multiply-accumulates at the configured input shape, set by
            :func:`mmsparse.cgmq.trace_macs` (not persisted: it is a function of the config).
    """

    method = 'cgmq'
    compression_state = ('weight_range', 'act_range', 'weight_gate', 'act_gate', 'act_signed',
                         'calibrated')
    weight: nn.Parameter

    def init_compression(self, bits_w: int = 8, bits_a: int = 8, per_channel: bool = True,
                         act_signed: Optional[bool] = None, quant_act: bool = True,
                         gate_init: float = 0.1) -> None:
        """See :class:`CGMQConv2d` for the options."""
        out_channels = self.weight.shape[0]
        self.per_channel = per_channel
        self.quant_act = quant_act
        self.gate_init = float(gate_init)
        self.weight_range = nn.Parameter(torch.ones(out_channels if per_channel else 1))
        self.act_range = nn.Parameter(torch.ones(1))
        self.weight_gate = nn.Parameter(torch.tensor(gate_values_for_bits(bits_w, gate_init)))
        self.act_gate = nn.Parameter(torch.tensor(gate_values_for_bits(bits_a, gate_init)))
        self.register_buffer('act_signed', torch.tensor(bool(act_signed) if act_signed is not None
                                                        else True))
        self.register_buffer('calibrated', torch.tensor(False))
        self.act_signed_cfg = act_signed
        self.macs: Optional[int] = None
        self._observer: Optional[dict] = None
        self.qdq_export = False
        # host copies of device state during a training step, keyed on the tensor's version
        # (see host_state); None outside a step: every read goes to the tensor
        self._host: Optional[Dict[str, tuple]] = None

    # -- bit widths -----------------------------------------------------------------------------
    def host_state(self, name: str):
        """The host value of ``'weight_gate'`` / ``'act_gate'`` (bit width) or ``'act_signed'``.

        Inside a training step (:func:`cache_host_states`) it is read from the device only when the
        tensor changed since the last read (its in-place version: the optimizer step, the greedy
        reduction), and :func:`read_host_states` reads those of all layers in one
        synchronisation; outside a step every call reads the tensor.
        """
        tensor = getattr(self, name)
        if self._host is None:
            return _host_value(name, tensor.detach().flatten().tolist())
        cached = self._host.get(name)
        if cached is None or cached[0] != _key(tensor):
            read_host_states([self])
            cached = self._host[name]
        return cached[1]

    @property
    def bits_w(self) -> int:
        """Current weight bit width (from the gates)."""
        return self.host_state('weight_gate')

    @property
    def bits_a(self) -> int:
        """Current input-activation bit width (32 when activations are not quantized)."""
        return self.host_state('act_gate') if self.quant_act else 32

    @property
    def signed_input(self) -> bool:
        """Whether the input range is ``[−β, β]`` (the ``act_signed`` buffer, read once per change)."""
        return self.host_state('act_signed')

    def bops(self) -> int:
        """``MACs · b_w · b_a`` at the current gates (needs :attr:`macs`)."""
        if self.macs is None:
            raise RuntimeError('MACs were not traced for this layer: call trace_macs(model, ...) '
                               '(CGMQHook does it in before_run)')
        return self.macs * self.bits_w * self.bits_a

    # -- quantizers -----------------------------------------------------------------------------
    def _weight_beta(self) -> Tensor:
        beta = self.weight_range.abs().clamp_min(1e-8)
        return beta.view(-1, *([1] * (self.weight.dim() - 1)))

    def _act_beta(self) -> Tensor:
        return self.act_range.abs().clamp_min(1e-8)

    def quant_weight(self) -> Tensor:
        """The fake-quantized weight (straight-through gradients to weight, range and gates)."""
        return nested_quantize(self.weight, self._weight_beta(), True, self.weight_gate, self.bits_w)

    def quant_input(self, x: Tensor) -> Tensor:
        """The fake-quantized input activation."""
        if not self.quant_act:
            return x
        if self.qdq_export:
            return self._qdq_input(x)
        # in float32 even under autocast: bf16 cannot hold an 8-bit residual grid
        x_q = nested_quantize(x.float(), self._act_beta(), self.signed_input, self.act_gate,
                              self.bits_a)
        return x_q.to(x.dtype)

    def layer_input(self, x: Tensor) -> Tensor:
        """The quantized input; the input itself (recorded) while calibration observes."""
        if self._observer is not None:
            self._observe(x)
            return x
        return self.quant_input(x)

    def layer_weight(self) -> Tensor:
        """The quantized weight (its Q/DQ form during export; the float weight while observing)."""
        if self._observer is not None:
            return self.weight
        if self.qdq_export:
            return self._qdq_weight()
        return self.quant_weight()

    # -- calibration ----------------------------------------------------------------------------
    def start_observing(self) -> None:
        """Record input statistics (and skip quantization) until :meth:`stop_observing`."""
        self._observer = dict(max_abs=[], min=[])

    def _observe(self, x: Tensor) -> None:
        x = x.detach().float()
        self._observer['max_abs'].append(x.abs().max())
        self._observer['min'].append(x.min())

    def stop_observing(self) -> Optional[dict]:
        """Stop recording; return ``dict(max_abs=mean of batch maxima, min=overall min)`` or None."""
        obs, self._observer = self._observer, None
        if not obs or not obs['max_abs']:
            return None
        return dict(max_abs=torch.stack(obs['max_abs']).mean(), min=torch.stack(obs['min']).min())

    @torch.no_grad()
    def set_ranges(self, act_max_abs: Optional[Tensor], act_min: Optional[Tensor]) -> None:
        """Initialise ranges: weights from their max |w|, activations from observed statistics."""
        w = self.weight.detach().abs()
        w_max = w.flatten(1).amax(dim=1) if self.per_channel else w.max().view(1)
        self.weight_range.copy_(w_max.clamp_min(1e-8))
        if act_max_abs is not None:
            self.act_range.fill_(max(float(act_max_abs), 1e-8))
            if self.act_signed_cfg is None:
                self.act_signed.fill_(bool(float(act_min) < 0))
        self.calibrated.fill_(True)

    # -- protocol shared with report / fold / export -------------------------------------------
    @torch.no_grad()
    def folded_weight(self) -> Tensor:
        """The quantized weight values in float: what a plain ``nn.Conv2d`` / ``nn.Linear`` holds."""
        return nested_quantize(self.weight, self._weight_beta(), True, self.weight_gate)

    @torch.no_grad()
    def fold_spec(self) -> FoldSpec:
        """The bit widths and the current grids (:class:`~mmsparse.core.QuantGrid`).

        ``weight_scale``: the step of the ``bits_w``-bit weight grid per output channel (one value
        for a per-tensor range), so ``weight / weight_scale`` are integer codes; ``act_scale``: the
        step of the input grid (None when inputs are not quantized); ``act_signed``: whether the
        input range is ``[−β, β]`` (else ``[0, β]``).
        """
        beta_w = self._weight_beta().flatten()
        weight_scale = scales(2.0 * beta_w)[BIT_WIDTHS.index(self.bits_w)]
        act_scale = None
        if self.quant_act:
            beta_a = self._act_beta()
            span = 2.0 * beta_a if self.signed_input else beta_a
            act_scale = float(scales(span)[BIT_WIDTHS.index(self.bits_a)])
        grid = QuantGrid(self.bits_w, self.bits_a, tuple(float(v) for v in weight_scale.cpu()),
                         act_scale, self.signed_input)
        return FoldSpec(self.method, grid)

    @property
    def quantizes_input(self) -> bool:
        """Whether the input activation is quantized."""
        return self.quant_act

    # -- QDQ export (mmsparse.export.qdq) -------------------------------------------------------
    @torch.no_grad()
    def prepare_qdq(self) -> None:
        """Freeze the QDQ constants (quantized weight, scales, bounds) before an ONNX export.

        They are plain tensors and Python numbers, so the exporter records constants instead of
        the quantizer arithmetic on the parameters.
        """
        bits = self.bits_w
        w_q = self.folded_weight()
        w_scale = None
        if bits <= 8:
            w_scale = scales(2.0 * self._weight_beta().flatten())[BIT_WIDTHS.index(bits)].float()
            w_scale = w_scale.expand(w_q.shape[0]).contiguous()
        act = clip = None
        if self.quant_act:
            signed = self.signed_input
            beta = self._act_beta()
            if self.bits_a <= 8:
                scale = float(scales(2.0 * beta if signed else beta)[BIT_WIDTHS.index(self.bits_a)])
                lo, hi = code_range(self.bits_a, signed)
                act = (scale, lo, hi, -128 if signed else 0, 127 if signed else 255)
            else:
                clip = (-float(beta) if signed else 0.0, float(beta))
        # a (frozen, temporary) parameter, so the exporter keeps it as an initializer feeding the
        # Q/DQ nodes instead of folding them into a float constant
        setattr(self, self.QDQ_WEIGHT, nn.Parameter(w_q, requires_grad=False))
        self._qdq = dict(w_scale=w_scale, act=act, clip=clip)

    def release_qdq(self) -> None:
        """Drop the constants of :meth:`prepare_qdq`."""
        self._qdq = None
        self._parameters.pop(self.QDQ_WEIGHT, None)

    def _qdq_weight(self) -> Tensor:
        qdq, weight = self._qdq, getattr(self, self.QDQ_WEIGHT)
        if qdq['w_scale'] is None:
            return weight  # carried in float (the 16/32-bit grid is finer than int8)
        zero = torch.zeros(qdq['w_scale'].numel(), dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, qdq['w_scale'], zero, 0, -128, 127)

    def _qdq_input(self, x: Tensor) -> Tensor:
        if self._qdq['act'] is None:
            clip = self._qdq['clip']  # 16/32 bits: float, clipped to the learned range
            return x if clip is None else torch.clamp(x, *clip)
        scale, lo, hi, qmin, qmax = self._qdq['act']
        x = torch.fake_quantize_per_tensor_affine(x, scale, 0, qmin, qmax)
        if (lo, hi) == (qmin, qmax):
            return x  # unsigned 8 bits: the uint8 range is the code range
        # a narrower code range (signed: no -128; below 8 bits: clipped int8 / uint8 range). The
        # Clip follows the DequantizeLinear: ORT's QDQ fusions change results with Clip → Q here.
        return torch.clamp(x, lo * scale, hi * scale)

    def compression_repr(self) -> str:  # noqa: D102
        act = f'a{self.bits_a}{"s" if self.signed_input else "u"}' if self.quant_act else 'a-'
        return f'w{self.bits_w}{act}'


_HOST_STATES = ('weight_gate', 'act_gate', 'act_signed')


def _host_value(name: str, values: list):
    """The bit width of gate values, or the flag of ``act_signed``."""
    return bool(values[0]) if name == 'act_signed' else bits_from_states([v > 0 for v in values])


def cache_host_states(layers: Iterable[CGMQMixin], enabled: bool) -> None:
    """Keep host copies of the gates and ``act_signed`` (``enabled``) or drop them.

    CGMQHook enables them for the span of each training step, so a step reads them once per change
    instead of once per use.
    """
    for layer in layers:
        layer._host = {} if enabled else None


@torch.no_grad()
def read_host_states(layers: Iterable[CGMQMixin]) -> None:
    """Refresh the host copies (:func:`cache_host_states`) of the gates and ``act_signed`` of
    ``layers`` that changed, with one device-to-host copy for all of them."""
    stale = [(layer, name, getattr(layer, name)) for layer in layers if layer._host is not None
             for name in _HOST_STATES
             if layer._host.get(name, (None,))[0] != _key(getattr(layer, name))]
    if not stale:
        return
    values = torch.cat([t.detach().float().flatten() for _, _, t in stale]).tolist()
    at = 0
    for layer, name, tensor in stale:
        size = tensor.numel()
        layer._host[name] = (_key(tensor), _host_value(name, values[at:at + size]))
        at += size


@MODELS.register_module()
class CGMQConv2d(CGMQMixin, CompressedConv2d):
    """Conv2d with CGMQ weight and input-activation quantization.

    Args:
        *args: ``nn.Conv2d`` arguments.
        bits_w (int): Initial weight bit width, one of 2, 4, 8, 16, 32. Defaults to 8.
        bits_a (int): Initial input bit width. Defaults to 8.
        per_channel (bool): Weight range per output channel (else per tensor). Defaults to True.
        act_signed (bool | None): Input range ``[−β, β]`` (True) or ``[0, β]`` (False); None decides
            at calibration from the observed minimum. Defaults to None.
        quant_act (bool): Quantize the input activation. Defaults to True.
        gate_init (float): Magnitude of the initial gate values (``+gate_init`` on, ``−gate_init``
            off); with Adam-type optimizers a gate flips after about ``gate_init / lr`` steps of a
            consistent push. Defaults to 0.1.
        **kwargs: ``nn.Conv2d`` keyword arguments.
    """


@MODELS.register_module()
class CGMQLinear(CGMQMixin, CompressedLinear):
    """Linear layer with CGMQ weight and input-activation quantization (arguments as
    :class:`CGMQConv2d`)."""
