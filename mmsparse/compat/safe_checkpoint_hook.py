"""SafeCheckpointHook: save checkpoints that load under ``torch.load(weights_only=True)``."""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from .checkpoint import to_plain


@HOOKS.register_module()
class SafeCheckpointHook(Hook):
    """Store the message hub and meta of every checkpoint in plain Python types.

    mmengine pickles ``HistoryBuffer`` objects (numpy arrays and bound methods) and numpy scalars into
    checkpoints, which torch >= 2.6 refuses to load with ``weights_only=True``. This hook runs last
    before saving; :func:`mmsparse.compat.safe_load_from_local` restores the buffers on load.
    """

    priority = 'LOWEST'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:  # noqa: D102
        for key in ('message_hub', 'meta'):
            if key in checkpoint:
                checkpoint[key] = to_plain(checkpoint[key])
