"""Engine pieces shared by the methods: the method hooks' base, gradient-edit optimizer wrappers,
layer converter."""
from .compression_hook import CompressionHook
from .converter import ConvertedModel, convert_layers
from .grad_edit import GradEditAmpOptimWrapper, GradEditMixin, GradEditOptimWrapper
from .rng_state_hook import RNGStateHook
from .runner import SparseRunner, bind_workers_to_parent
from .sanity_check_hook import SanityCheckHook

__all__ = ['CompressionHook', 'ConvertedModel', 'convert_layers', 'GradEditMixin', 'GradEditOptimWrapper',
           'GradEditAmpOptimWrapper', 'RNGStateHook', 'SanityCheckHook', 'SparseRunner',
           'bind_workers_to_parent']
