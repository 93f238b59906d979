"""SafeCheckpointHook: save checkpoints that load under ``weights_only=True``; check what is loaded."""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from .checkpoint import to_plain


@HOOKS.register_module()
class SafeCheckpointHook(Hook):
    """Store checkpoints in plain Python types, and refuse checkpoints that do not fit the model.

    mmengine pickles ``HistoryBuffer`` objects (numpy arrays and bound methods) and numpy scalars into
    checkpoints, which torch >= 2.6 refuses to load with ``weights_only=True``. This hook runs last
    before saving; :func:`mmsparse.compat.safe_load_from_local` restores the buffers on load.

    On load, mmengine loads non-strictly and only logs mismatches, so a checkpoint of another
    architecture (or with a key prefix the model does not use) would silently leave the model
    untrained. This hook raises instead when a checkpoint shares no parameter with the model or
    holds a tensor whose shape differs from the model's.
    """

    priority = 'LOWEST'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:  # noqa: D102
        for key in ('message_hub', 'meta'):
            if key in checkpoint:
                checkpoint[key] = to_plain(checkpoint[key])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:  # noqa: D102
        state = checkpoint.get('state_dict', checkpoint)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        own = model.state_dict()
        state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
        shared = [k for k in state if k in own]
        if not shared:
            raise RuntimeError('the checkpoint shares no parameter name with the model (another '
                               f'architecture or key prefix?); first keys: {list(state)[:3]}')
        wrong = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
                 for k in shared if hasattr(state[k], 'shape') and state[k].shape != own[k].shape]
        if wrong:
            raise RuntimeError(f'the checkpoint does not fit the model ({len(wrong)} tensors differ '
                               'in shape; another architecture?): ' + '; '.join(wrong[:3]))
