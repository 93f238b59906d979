"""Builds mmsparse's CPU kernels (``mmsparse/csrc``) into ``mmsparse._ext``; metadata is in setup.cfg."""
from glob import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension(
            'mmsparse._ext',
            sorted(glob('mmsparse/csrc/*.cpp')),
            # at::parallel_for runs on torch's OpenMP thread pool only when compiled with OpenMP;
            # no contraction into FMAs, so the quantizer stays bit-identical to its tensor-op version.
            extra_compile_args=['-O3', '-fopenmp', '-ffp-contract=off'],
            extra_link_args=['-fopenmp'])
    ],
    cmdclass={'build_ext': BuildExtension})
