"""Fixes for the pinned stack on current torch, installed when :mod:`mmsparse` is imported."""
from .checkpoint import (TRUST_ENV, UnsafeCheckpointError, install_safe_checkpoint_loading,
                         safe_load_from_local, to_plain)
from .safe_checkpoint_hook import SafeCheckpointHook

install_safe_checkpoint_loading()

__all__ = ['TRUST_ENV', 'UnsafeCheckpointError', 'install_safe_checkpoint_loading',
           'safe_load_from_local', 'to_plain', 'SafeCheckpointHook']
