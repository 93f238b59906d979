"""SanityCheckHook: checkpoints that would silently load nothing fail before training, clearly."""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..compat import check_compression_matches


@HOOKS.register_module()
class SanityCheckHook(Hook):
    """Refuse checkpoints that do not fit the model.

    MMEngine loads checkpoints non-strictly and only logs mismatches, so a checkpoint of another
    architecture (or with a key prefix the model does not use) would silently leave the model
    untrained.
    """

    priority = 'VERY_HIGH'

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
        check_compression_matches(model, state, runner._load_from, runner._resume)
