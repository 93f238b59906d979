"""Test-only hook: every rank writes its compression state after calibration and after each step.

Imported by the training subprocesses of the DDP tests (``custom_imports``, with this directory on
``PYTHONPATH``) and by the in-test runners; the tests then compare the files of different ranks or
different world sizes.
"""
import hashlib
import os
import os.path as osp
from typing import Optional

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

# state_dict keys of every method's compression state: CGMQ gates, ranges and range flags, SA++ /
# ACDC logits and supports, N:M masks
STATE_SUFFIXES = ('_gate', '_range', '.act_signed', '.calibrated', '.block_logits', '.support',
                  '.mask')


def digest(tensor: torch.Tensor) -> str:
    """Hex digest of a tensor's raw bytes (bit-exact comparison without storing the tensor)."""
    data = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def load_dump(work_dir: str, step: int, rank: int) -> dict:
    """What :class:`RankStateDumpHook` wrote for ``step`` (0: before the first step), ``rank``."""
    return torch.load(osp.join(work_dir, 'rank_state', f'step{step}_rank{rank}.pth'),
                      weights_only=True)


@HOOKS.register_module()
class RankStateDumpHook(Hook):
    """Save ``{work_dir}/rank_state/step{t}_rank{r}.pth`` on every rank.

    Each file holds the compression-state tensors (``state``), sha256 digests of every parameter
    (``params``) and of the other buffers (``buffers``, e.g. batch-norm statistics), and the
    image ids of the batch this rank trained on (``img_ids``, detection data only). Step 0 is
    written in ``before_train`` (after calibration and the first masks), step ``t`` after
    iteration ``t`` once the method hooks have set the state of the next iteration.
    """

    priority = 'LOWEST'

    def _dump(self, runner, step: int, data_batch: Optional[dict] = None) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        state = model.state_dict()
        params = dict(model.named_parameters())
        samples = (data_batch or {}).get('data_samples') or []
        dump = dict(
            state={k: v.detach().clone() for k, v in state.items() if k.endswith(STATE_SUFFIXES)},
            params={k: digest(v) for k, v in params.items()},
            buffers={k: digest(v) for k, v in state.items()
                     if k not in params and not k.endswith(STATE_SUFFIXES)},
            img_ids=[s.metainfo.get('img_id') for s in samples if hasattr(s, 'metainfo')])
        out_dir = osp.join(runner.work_dir, 'rank_state')
        os.makedirs(out_dir, exist_ok=True)
        torch.save(dump, osp.join(out_dir, f'step{step}_rank{get_rank()}.pth'))

    def before_train(self, runner) -> None:  # noqa: D102
        self._dump(runner, runner.iter)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:  # noqa: D102
        self._dump(runner, runner.iter + 1, data_batch)
