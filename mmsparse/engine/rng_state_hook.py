"""RNGStateHook: make resumed training draw the same random numbers as an uninterrupted run."""
import random
from typing import Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save the main process's torch / numpy / python RNG states in checkpoints; restore on resume.

    MMEngine re-seeds on resume but does not restore RNG *states*, so RPN/RoI samplers (torch RNG)
    draw different proposals after a resume than in an uninterrupted run. The states are stored in
    plain types (loadable with ``weights_only=True``) and restored right before the first iteration
    after resuming, i.e. after the train loop has skipped the already-seen batches.

    Note:
        Data-pipeline randomness lives in dataloader workers, which MMEngine seeds per worker; with
        ``num_workers >= 1`` the data stream after a resume is identical as well.
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._pending: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:  # noqa: D102
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, state, gauss = random.getstate()
        checkpoint['rng_state'] = dict(
            torch=torch.get_rng_state(),
            numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                       has_gauss=int(has_gauss), cached=float(cached)),
            python=dict(version=version, state=list(state), gauss=gauss))

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:  # noqa: D102
        if not runner._resume:
            return
        self._pending = checkpoint.get('rng_state')
        if self._pending is None:
            runner.logger.warning('RNGStateHook: the resumed checkpoint has no RNG state; random '
                                  'draws will differ from an uninterrupted run')

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:  # noqa: D102
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state['torch'])
        npy = state['numpy']
        np.random.set_state((npy['kind'], npy['keys'].numpy().astype(np.uint32), npy['pos'],
                             npy['has_gauss'], npy['cached']))
        py = state['python']
        random.setstate((py['version'], tuple(py['state']), py['gauss']))
