"""Inference-only conv / linear layers holding a folded sparse weight in the runtime's CSR form.

A packed layer runs one of two tactics, chosen at pack time (:func:`mmsparse.runtime.pack`):

* ``'sparse'``: the compiled kernels ``torch.ops.mmsparse.nm_conv2d`` / ``nm_linear``
  (``mmsparse/csrc/nm_conv.cpp``) on the CSR buffers, or ``bsr_conv2d`` / ``bsr_linear`` on the BSR
  arrays of a block pattern; only the non-zeros (non-zero blocks) are stored and multiplied;
* ``'dense'``: ``F.conv2d`` / ``F.linear`` on the dense weight (kept only for this tactic).

Fusion (pack time, mmdet's conv -> BatchNorm -> in-place ReLU): an eval-mode BatchNorm right after a
packed conv is folded into its weight and bias, and the ReLU after it runs in the kernel; the
BatchNorm becomes ``nn.Identity`` and the ReLU module a :class:`FusedReLU` that passes the packed
conv's unchanged output through.

CSR form (one row per output channel, non-zeros of a row ordered by input channel, then kernel
position): ``values`` float32, ``channels`` int32 (input channel), ``taps`` uint8 (kernel position
``r * kw + s``; convs only), ``row_ptr`` int64 ``(out_channels + 1,)``. The layer's geometry, pattern
and tactic travel in its extra state, so a packed ``state_dict`` loads without re-packing
(:func:`mmsparse.runtime.load_packed`).
"""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.blocks import BlockPattern
from ..core.ext import kernels_available
from ..core.spec import parse_pattern

FORMAT_VERSION = 1
TACTICS = ('sparse', 'dense')
Geometry = Dict[str, Any]


def geometry_of(module: nn.Module) -> Geometry:
    """The fields a packed layer must share with the ``nn.Conv2d`` / ``nn.Linear`` it replaces."""
    if isinstance(module, nn.Conv2d):
        return dict(kind='conv2d', in_channels=module.in_channels, out_channels=module.out_channels,
                    kernel_size=tuple(module.kernel_size), stride=tuple(module.stride),
                    padding=tuple(module.padding), dilation=tuple(module.dilation),
                    bias=module.bias is not None)
    if isinstance(module, nn.Linear):
        return dict(kind='linear', in_channels=module.in_features, out_channels=module.out_features,
                    bias=module.bias is not None)
    raise TypeError(f'no packed layer for {type(module).__name__}')


def to_csr(weight: Tensor) -> Dict[str, Tensor]:
    """CSR buffers of the exact non-zeros of a conv ``(O, I, kh, kw)`` or linear ``(O, I)`` weight."""
    weight = weight.detach().to(torch.float32)
    out_channels, in_channels = weight.shape[:2]
    taps_per_channel = weight[0, 0].numel()
    flat = weight.reshape(out_channels, in_channels * taps_per_channel)  # column = c * kh * kw + tap
    rows, cols = torch.nonzero(flat, as_tuple=True)  # row-major: rows ascending, columns within a row
    row_ptr = torch.zeros(out_channels + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=out_channels).cumsum(0)
    csr = dict(values=flat[rows, cols].contiguous(), row_ptr=row_ptr,
               channels=torch.div(cols, taps_per_channel, rounding_mode='floor').to(torch.int32))
    if weight.dim() == 4:
        csr['taps'] = (cols % taps_per_channel).to(torch.uint8)
    return csr


def from_csr(csr: Dict[str, Tensor], shape: Tuple[int, ...]) -> Tensor:
    """The dense weight of ``shape`` rebuilt from :func:`to_csr` buffers (bit-exact)."""
    out_channels, in_channels = shape[:2]
    taps_per_channel = 1 if len(shape) == 2 else shape[2] * shape[3]
    rows = torch.repeat_interleave(torch.arange(out_channels), csr['row_ptr'].diff())
    cols = csr['channels'].long() * taps_per_channel
    if 'taps' in csr:
        cols = cols + csr['taps'].long()
    flat = csr['values'].new_zeros(out_channels, in_channels * taps_per_channel)
    flat[rows, cols] = csr['values']
    return flat.reshape(shape)


def fold_norm(weight: Tensor, bias: Optional[Tensor], norm: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """Weight and bias of a conv followed by the eval-mode ``norm`` (zeros stay exact zeros)."""
    scale = norm.running_var.double().add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    if bias is not None:
        shift = shift + bias.double() * scale
    folded = weight.double() * scale.reshape(-1, *[1] * (weight.dim() - 1))
    return folded.float(), shift.float()


class FusedReLU(nn.ReLU):
    """In-place ReLU whose work a packed conv already did: passes that conv's unchanged output on."""

    def forward(self, x: Tensor) -> Tensor:
        if getattr(x, '_mmsparse_relu_version', None) == x._version:
            return x
        return super().forward(x)


class PackedLayer(nn.Module):
    """Base of the packed layers: geometry, pattern, tactic, fusion (and timings) in the extra state."""

    _csr_names: Tuple[str, ...] = ()

    def __init__(self, geometry: Geometry, pattern: str, tactic: str,
                 timings: Optional[Dict[str, float]] = None, fused: Optional[Dict[str, str]] = None) -> None:
        super().__init__()
        if tactic not in TACTICS:
            raise ValueError(f'tactic must be one of {TACTICS}, got {tactic!r}')
        self.geometry = dict(geometry)
        self.pattern = pattern
        self.tactic = tactic
        self.timings = dict(timings or {})
        self.fused = dict(fused or {})  # {'norm': module name, 'relu': module name} folded in

    @classmethod
    def from_module(cls, module: nn.Module, pattern: str, tactic: str,
                    timings: Optional[Dict[str, float]] = None, norm: Optional[nn.BatchNorm2d] = None,
                    fused: Optional[Dict[str, str]] = None) -> 'PackedLayer':
        """Pack the (folded) weight of ``module`` for ``tactic``, folding in ``norm`` if given."""
        geometry = geometry_of(module)
        weight = module.weight.detach().to(torch.float32)
        bias = None if module.bias is None else module.bias.detach().to(torch.float32)
        if norm is not None:
            weight, bias = fold_norm(weight, bias, norm)
        layer = cls(geometry, pattern, tactic, timings, fused)
        if tactic == 'sparse':
            for name, tensor in layer._pack(weight).items():
                layer.register_buffer(name, tensor)
        else:
            layer.register_buffer('weight', weight.clone())
        layer.register_buffer('bias', None if bias is None else bias.clone())
        return layer

    @classmethod
    def from_state(cls, extra: Dict[str, Any], tensors: Dict[str, Tensor]) -> 'PackedLayer':
        """An empty layer shaped like the saved one (``extra`` state, ``{buffer: tensor}``)."""
        layer = cls(extra['geometry'], extra['pattern'], extra['tactic'], extra.get('timings'),
                    extra.get('fused'))
        names = layer._csr_names if layer.tactic == 'sparse' else ('weight',)
        for name in names:
            if name not in tensors:
                raise KeyError(name)
            layer.register_buffer(name, torch.empty_like(tensors[name]))
        # a conv without bias has one once a norm is folded into it
        layer.register_buffer('bias', torch.empty_like(tensors['bias']) if 'bias' in tensors else None)
        return layer

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        """Shape of the dense weight."""
        g = self.geometry
        return (g['out_channels'], g['in_channels']) + tuple(g.get('kernel_size', ()))

    def csr(self) -> Dict[str, Tensor]:
        """The sparse buffers (CSR, or BSR for the block layers; sparse tactic only)."""
        return {name: getattr(self, name) for name in self._csr_names}

    def dense_weight(self) -> Tensor:
        """The dense weight this layer computes with (rebuilt from the CSR for the sparse tactic)."""
        return self.weight if self.tactic == 'dense' else self._unpack(self.csr(), self.weight_shape)

    def _pack(self, weight: Tensor) -> Dict[str, Tensor]:
        return to_csr(weight)

    def _unpack(self, tensors: Dict[str, Tensor], shape: Tuple[int, ...]) -> Tensor:
        return from_csr(tensors, shape)

    def get_extra_state(self) -> Dict[str, Any]:
        return dict(format=FORMAT_VERSION, layer=type(self).__name__, geometry=self.geometry,
                    pattern=self.pattern, tactic=self.tactic, timings=self.timings, fused=self.fused)

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        mine = self.get_extra_state()
        for key in ('format', 'layer', 'geometry', 'pattern', 'tactic', 'fused'):
            if state.get(key) != mine[key]:
                raise ValueError(f'packed state does not match this {type(self).__name__}: {key} is '
                                 f'{state.get(key)!r} in the state, {mine[key]!r} here')
        self.timings = dict(state.get('timings') or {})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # the number of non-zeros is data: take the saved buffers' shapes
        for name, tensor in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if tensor is not None and saved is not None and saved.shape != tensor.shape:
                self._buffers[name] = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_input(self, x: Tensor) -> None:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f'{type(self).__name__} is inference-only: run it under torch.no_grad()')
        if self.tactic == 'sparse' and (x.device.type != 'cpu' or x.dtype != torch.float32):
            raise RuntimeError(f'{type(self).__name__} (sparse tactic) runs float32 CPU tensors, got '
                               f'{x.dtype} on {x.device}')

    def extra_repr(self) -> str:
        g = self.geometry
        text = f'{g["in_channels"]}, {g["out_channels"]}'
        if 'kernel_size' in g:
            text += f', kernel_size={g["kernel_size"]}, stride={g["stride"]}, padding={g["padding"]}'
            if g['dilation'] != (1, 1):
                text += f', dilation={g["dilation"]}'
        text += f', bias={self.bias is not None}, pattern={self.pattern}, tactic={self.tactic}'
        if self.fused:
            text += ', fused=' + '+'.join(sorted(self.fused))
        if self.timings:
            text += ', ' + ', '.join(f'{k}={v * 1e3:.3f}ms' for k, v in sorted(self.timings.items()))
        return text


class PackedConv2d(PackedLayer):
    """Base of the packed convs: the dense tactic, the fused ReLU and its marker."""

    def _sparse(self, x: Tensor, relu: bool) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        g, relu = self.geometry, 'relu' in self.fused
        if self.tactic == 'dense':
            out = F.conv2d(x, self.weight, self.bias, g['stride'], g['padding'], g['dilation'])
            if relu:
                out.relu_()
        else:
            out = self._sparse(x, relu)
        if relu:  # the FusedReLU after this layer passes it on while nothing changed it
            out._mmsparse_relu_version = out._version
        return out


class NMSparseConv2d(PackedConv2d):
    """Inference-only ``nn.Conv2d`` replacement running a folded sparse (e.g. N:M) weight in CSR form.

    Covered by the sparse kernel: ``groups == 1``, square stride, padding and dilation (any kernel
    size up to 256 positions), zero padding mode; :func:`coverage` says why a conv is not.
    """

    _csr_names = ('values', 'channels', 'taps', 'row_ptr')

    def _sparse(self, x: Tensor, relu: bool) -> Tensor:
        g = self.geometry
        kh, kw = g['kernel_size']
        return torch.ops.mmsparse.nm_conv2d(x, self.values, self.channels, self.taps, self.row_ptr, self.bias,
                                            kh, kw, g['stride'][0], g['padding'][0], g['dilation'][0], relu)


class BlockSparseConv2d(PackedConv2d):
    """``nn.Conv2d`` replacement for a B×B block-sparse weight (SA++): BSR arrays of the 2-D view
    (:meth:`mmsparse.core.blocks.BlockPattern.pack`), run by ``torch.ops.mmsparse.bsr_conv2d``;
    needs ``B % 4 == 0`` dividing the input and output channels (:func:`packed_layer_for`)."""

    _csr_names = ('values', 'col_indices', 'crow_indices')

    def _pack(self, weight: Tensor) -> Dict[str, Tensor]:
        return parse_pattern(self.pattern).pack(weight)

    def _unpack(self, tensors: Dict[str, Tensor], shape: Tuple[int, ...]) -> Tensor:
        return parse_pattern(self.pattern).unpack(tensors, shape)

    def _sparse(self, x: Tensor, relu: bool) -> Tensor:
        g = self.geometry
        kh, kw = g['kernel_size']
        return torch.ops.mmsparse.bsr_conv2d(x, self.values, self.col_indices, self.crow_indices, self.bias,
                                             kh, kw, g['stride'][0], g['padding'][0], g['dilation'][0], relu)


class PackedLinear(PackedLayer):
    """Base of the packed linears: the dense tactic and any leading dims."""

    def _sparse(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.tactic == 'dense':
            return F.linear(x, self.weight, self.bias)
        out = self._sparse(x.reshape(-1, x.shape[-1]))
        return out.reshape(*x.shape[:-1], out.shape[-1])


class NMSparseLinear(PackedLinear):
    """Inference-only ``nn.Linear`` replacement running a folded sparse (e.g. N:M) weight in CSR form."""

    _csr_names = ('values', 'channels', 'row_ptr')

    def _sparse(self, x: Tensor) -> Tensor:
        return torch.ops.mmsparse.nm_linear(x, self.values, self.channels, self.row_ptr, self.bias)


class BlockSparseLinear(PackedLinear):
    """``nn.Linear`` replacement for a B×B block-sparse weight (BSR, ``torch.ops.mmsparse.bsr_linear``)."""

    _csr_names = ('values', 'col_indices', 'crow_indices')
    _pack = BlockSparseConv2d._pack
    _unpack = BlockSparseConv2d._unpack

    def _sparse(self, x: Tensor) -> Tensor:
        return torch.ops.mmsparse.bsr_linear(x, self.values, self.col_indices, self.crow_indices, self.bias)


PACKED_TYPES = {cls.__name__: cls for cls in (NMSparseConv2d, NMSparseLinear, BlockSparseConv2d,
                                               BlockSparseLinear)}


def coverage(module: nn.Module) -> Optional[str]:
    """Why the sparse kernels cannot run ``module`` (``None`` when they can)."""
    if isinstance(module, nn.Conv2d):
        if type(module).forward is not nn.Conv2d.forward and not _is_plain_wrapper(module):
            return f'{type(module).__name__} has its own forward'
        if module.groups != 1:
            return f'groups={module.groups}'
        if module.padding_mode != 'zeros':
            return f'padding_mode={module.padding_mode!r}'
        if isinstance(module.padding, str):
            return f'padding={module.padding!r}'
        for name in ('stride', 'padding', 'dilation'):
            value = getattr(module, name)
            if value[0] != value[1]:
                return f'{name}={tuple(value)} is not square'
        if module.kernel_size[0] * module.kernel_size[1] > 256:
            return f'kernel_size={tuple(module.kernel_size)} has more than 256 positions'
        return None
    if isinstance(module, nn.Linear):
        if type(module).forward is not nn.Linear.forward and not _is_plain_wrapper(module):
            return f'{type(module).__name__} has its own forward'
        return None
    return f'{type(module).__name__} is no nn.Conv2d or nn.Linear'


def _is_plain_wrapper(module: nn.Module) -> bool:
    """mmcv's empty-tensor wrappers (``mmcv.cnn.bricks.wrappers``) compute what the torch layer does."""
    return type(module).__module__.startswith('mmcv.cnn.bricks.wrappers')


def packed_layer_for(module: nn.Module, pattern: Any = None) -> type:
    """The packed layer class replacing ``module``: BSR for a block pattern whose block size (a
    multiple of 4) divides the input and output channels, CSR otherwise (any sparsity)."""
    conv = isinstance(module, nn.Conv2d)
    if isinstance(pattern, BlockPattern) and pattern.size % 4 == 0:
        out_channels, in_channels = module.weight.shape[:2]
        if in_channels % pattern.size == 0 and out_channels % pattern.size == 0:
            return BlockSparseConv2d if conv else BlockSparseLinear
    return NMSparseConv2d if conv else NMSparseLinear


def ensure_kernels() -> None:
    """Raise when ``mmsparse._ext`` (the sparse kernels) is not built."""
    if not kernels_available() or not hasattr(torch.ops.mmsparse, 'nm_conv2d'):
        raise RuntimeError('the sparse kernels (mmsparse._ext with nm_conv2d) are not built: run '
                           '`bash tools/install.sh`, or pack with tactic="dense"')

