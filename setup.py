"""mmdrq: Double Rounding multi-precision QAT for OpenMMLab."""
import os
import os.path as osp
import shutil

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def read_version():
    scope = {}
    with open(osp.join(HERE, 'mmdrq', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def add_mim_extension():
    """Ship configs/ and tools/ inside the package as ``mmdrq/.mim`` (the
    OpenMMLab layout), so ``mmdrq::`` config paths resolve when installed.
    Editable installs get symlinks, others copies."""
    mim = osp.join(HERE, 'mmdrq', '.mim')
    os.makedirs(mim, exist_ok=True)
    for name in ('configs', 'tools'):
        src, dst = osp.join(HERE, name), osp.join(mim, name)
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        try:
            os.symlink(osp.relpath(src, mim), dst)
        except OSError:
            shutil.copytree(src, dst)


if __name__ == '__main__':
    add_mim_extension()
    setup(
        name='mmdrq',
        version=read_version(),
        description='One-shot multi-precision and mixed-precision QAT with '
        'Double Rounding for OpenMMLab (arXiv 2502.01199)',
        long_description=open(osp.join(HERE, 'README.md')).read()
        if osp.exists(osp.join(HERE, 'README.md')) else '',
        long_description_content_type='text/markdown',
        packages=find_packages(exclude=('tests', 'tests.*', 'benchmarks')),
        include_package_data=True,
        package_data={'mmdrq': ['.mim/configs/**/*', '.mim/tools/**/*',
                                '.mim/tools/*', 'quantization/csrc/*.cpp']},
        python_requires='>=3.8',
        # Ranges, not pins: a GPU user keeps the CUDA torch they have.
        install_requires=[
            'torch>=2.0', 'mmengine>=0.10.0,<1.0', 'numpy', 'scipy>=1.9',
            'matplotlib', 'setuptools<82',
            'ninja',  # torch's loader builds the CPU kernels with it
        ],
        extras_require={
            'mm': ['mmcv>=2.0.0,<2.2.0', 'mmpretrain>=1.0.0',
                   'mmdet>=3.0.0', 'mmsegmentation>=1.0.0', 'ftfy', 'regex'],
            'tests': ['pytest', 'scikit-learn', 'scikit-image'],
            # the real-image data of benchmarks/lowbit_detseg.py
            'data': ['scikit-learn', 'scikit-image>=0.19'],
            # the export; the deploy host needs onnx, onnxruntime, and
            # OpenCV for mmdrq_runtime.Inferencer
            'deploy': ['onnx>=1.17', 'onnxruntime>=1.20', 'onnxscript>=0.5',
                       'opencv-python'],
            # the language-model path (mmdrq/llm); mmpretrain 1.2.0 no longer
            # imports beside transformers 4.57 and 5.x (its BLIP language
            # model subclasses a PreTrainedModel it then fails to import);
            # 4.46 to 4.51 are tested
            'llm': ['transformers>=4.46,<4.52'],
        },
        zip_safe=False)
