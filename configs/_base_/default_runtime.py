# mmdet's runtime with mmsparse registered; every mmsparse config inherits this.
_base_ = 'mmdet::_base_/default_runtime.py'

custom_imports = dict(imports=['mmsparse'], allow_failed_imports=False)

# Checkpoints in plain types, so resume works with torch.load(weights_only=True) (docs/compat.md),
# RNG states saved with them, so a resumed run draws the same samples as an uninterrupted one, and
# early errors for checkpoints that do not fit the model.
default_hooks = dict(
    safe_checkpoint=dict(type='SafeCheckpointHook'),
    rng_state=dict(type='RNGStateHook'),
    sanity_check=dict(type='SanityCheckHook'))
# mmengine's runner whose data-loader workers die with it (a killed run leaves no orphaned worker).
runner_type = 'SparseRunner'
