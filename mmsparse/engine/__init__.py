"""Engine pieces shared by the methods: gradient-edit optimizer wrappers, layer converter."""
from .converter import ConvertedModel, convert_layers
from .grad_edit import GradEditAmpOptimWrapper, GradEditMixin, GradEditOptimWrapper
from .rng_state_hook import RNGStateHook
from .runner import SparseRunner, bind_workers_to_parent
from .sanity_check_hook import SanityCheckHook

__all__ = ['ConvertedModel', 'convert_layers', 'GradEditMixin', 'GradEditOptimWrapper',
           'GradEditAmpOptimWrapper', 'RNGStateHook', 'SanityCheckHook', 'SparseRunner',
           'bind_workers_to_parent']
