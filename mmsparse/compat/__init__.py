"""Fixes for the pinned stack on current torch, installed when :mod:`mmsparse` is imported."""
from .checkpoint import (DANGEROUS_GLOBALS, TRUST_ENV, CheckpointMismatchError,
                         UnsafeCheckpointError, check_compression_matches, compression_layer_types,
                         install_safe_checkpoint_loading, referenced_globals, safe_load_from_local,
                         to_plain)
from .safe_checkpoint_hook import SafeCheckpointHook

install_safe_checkpoint_loading()

__all__ = ['DANGEROUS_GLOBALS', 'TRUST_ENV', 'CheckpointMismatchError', 'UnsafeCheckpointError',
           'check_compression_matches', 'compression_layer_types',
           'install_safe_checkpoint_loading', 'referenced_globals', 'safe_load_from_local',
           'to_plain', 'SafeCheckpointHook']
