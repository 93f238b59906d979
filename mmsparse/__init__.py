"""mmsparse: training-time compression of MMDetection detectors.

Importing the package registers its layers, hooks and optimizer wrappers into MMEngine's registries
(configs use ``custom_imports = dict(imports=['mmsparse'], allow_failed_imports=False)``) and installs
the checkpoint-loading fix for current torch (:mod:`mmsparse.compat`).
"""
from . import cgmq, compat, core, engine, export, maxq, sapp  # noqa: F401
from .version import __version__

__all__ = ['__version__']
