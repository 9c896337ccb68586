"""The CPU fake-quant kernels (``csrc/fake_quant.cpp``), built on first use.

torch's extension loader compiles the file once per machine (about 30 s;
it keeps the build under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and loads it in every later process. The
kernels are plain C++ with OpenMP, called straight from Python: what
Inductor's kernels of the same math cost per call in Dynamo's dispatch
(about 30 us, for ~120 calls per ResNet-18 step) is gone, and the loops
are vectorized for the CPU's instruction set, which names the build.
"""
import os.path as osp
import re

import torch

SOURCE = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc',
                  'fake_quant.cpp')
# exact IEEE arithmetic as in torch (no contraction into FMAs); without
# errno and traps, floor and rint vectorize; the C++ standard is the one
# torch's loader sets for its own headers
FLAGS = ('-O3', '-fopenmp', '-ffp-contract=off', '-fno-math-errno',
         '-fno-trapping-math')
ISA_FLAGS = {
    'AVX512': ('-mavx512f', '-mavx512dq', '-mavx512bw', '-mavx512vl',
               '-mavx2', '-mfma'),
    'AVX2': ('-mavx2', '-mfma'),
}


def load():
    """The compiled module (``forward``, ``backward``); raises when it cannot
    be built, e.g. without a C++ compiler."""
    from mmengine.logging import print_log
    from torch.utils import cpp_extension
    isa = torch.backends.cpu.get_cpu_capability()  # 'AVX2', 'NO AVX', ...
    name = 'mmdrq_fake_quant_' + re.sub(r'\W+', '_', isa.lower())
    print_log(f'mmdrq: loading the CPU fake-quant kernels ({name}; the '
              f'first time on a machine compiles them, about 30 s)',
              logger='current')
    return cpp_extension.load(
        name, [SOURCE], extra_cflags=[*FLAGS, *ISA_FLAGS.get(isa, ())],
        extra_ldflags=['-fopenmp'])
