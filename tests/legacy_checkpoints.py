"""Checkpoints of every method saved by an earlier mmsparse, for the compatibility tests.

``tests/data/legacy/`` holds, per method, a toy model's checkpoint after 2 of 4 iterations and the
folded state of the same model, both written by mmsparse at commit da643ae (before the layers and
hooks moved onto ``core.layers`` / ``engine.CompressionHook``). To write them again with the code
checked out here: ``python tests/legacy_checkpoints.py tests/data/legacy``.
"""
import os.path as osp
import sys

import torch
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mmsparse  # noqa: F401

DATA = osp.join(osp.dirname(__file__), 'data', 'legacy')
MAX_ITERS = 4

# per method: the layers (registered types and their options) and the hook
METHODS = dict(
    maxq=dict(conv=dict(type='MaxQConv2d', n=1, m=4), fc=dict(type='OneShotNMLinear', n=2, m=4),
              hook=dict(type='MaxQHook', schedule='linear', start=0, end=2),
              wrapper='NMSparseOptimWrapper'),
    sapp=dict(conv=dict(type='SAPPConv2d', block_size=4, min_blocks=4),
              fc=dict(type='MagnitudeBlockLinear', block_size=4, min_blocks=2),
              hook=dict(type='SequentialAttentionHook', sparsity=0.5, warmup=1, sparsify=2),
              wrapper='OptimWrapper'),
    cgmq=dict(conv=dict(type='CGMQConv2d', bits_w=8, bits_a=8), fc=dict(type='CGMQLinear'),
              hook=dict(type='CGMQHook', budget_relative=32 / 1024, input_shape=(16, 8, 8),
                        calib_batches=1),
              wrapper='CGMQOptimWrapper'))


class LegacyData(Dataset):
    """16 fixed samples ``dict(inputs=(16, 8, 8), targets=(8,))``."""

    def __len__(self):
        return 16

    def __getitem__(self, idx):
        g = torch.Generator().manual_seed(idx)
        return dict(inputs=torch.randn(16, 8, 8, generator=g), targets=torch.randn(8, generator=g))


class LegacyToy(BaseModel):
    """A conv and a linear layer of one method."""

    def __init__(self, method: str):
        super().__init__()
        torch.manual_seed(0)
        spec = METHODS[method]
        self.conv = MODELS.build(dict(spec['conv'], in_channels=16, out_channels=16, kernel_size=3,
                                      padding=1))
        self.fc = MODELS.build(dict(spec['fc'], in_features=16, out_features=8))

    def compression_keys(self) -> list:
        """State-dict keys of the layers' compression state."""
        own = self.state_dict()
        return [f'{name}.{key}' for name in ('conv', 'fc')
                for key in getattr(self, name).compression_state if f'{name}.{key}' in own]

    def forward(self, inputs, targets=None, mode='tensor'):
        out = self.fc(torch.relu(self.conv(inputs)).mean((2, 3)))
        if mode == 'loss':
            return dict(loss=nn.functional.mse_loss(out, targets))
        return out


def legacy_runner(method: str, work_dir: str, **kwargs) -> Runner:
    """The runner that wrote (and resumes) the method's checkpoint."""
    spec = METHODS[method]
    return Runner(
        model=LegacyToy(method), work_dir=work_dir,
        train_dataloader=DataLoader(LegacyData(), batch_size=4, shuffle=False),
        train_cfg=dict(by_epoch=False, max_iters=MAX_ITERS),
        optim_wrapper=dict(type=spec['wrapper'], optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        custom_hooks=[dict(spec['hook'], interval=1)],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           safe=dict(type='SafeCheckpointHook')),
        randomness=dict(seed=0), **kwargs)


def write(out_dir: str) -> None:
    """Train each toy for ``MAX_ITERS``; keep the mid-run checkpoint and the final folded state."""
    import shutil
    import tempfile

    from mmsparse.export import fold_state_dict
    for method in METHODS:
        with tempfile.TemporaryDirectory() as work:
            runner = legacy_runner(method, work, experiment_name=method)
            runner.train()
            shutil.copy(osp.join(work, 'iter_2.pth'), osp.join(out_dir, f'{method}_iter_2.pth'))
            state, _ = fold_state_dict(runner.model)
            torch.save(state, osp.join(out_dir, f'{method}_folded.pth'))


if __name__ == '__main__':
    write(sys.argv[1])
