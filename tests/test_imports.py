"""Rules of the package, read from its source: no module of mmdrq imports
another's private name, none is over 450 lines, and the deploy host's
package imports neither torch, OpenMMLab nor mmdrq."""
import ast
import glob
import os.path as osp

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def imports(package: str):
    """(file, imported module, names) of every import in ``package``."""
    for path in glob.glob(osp.join(ROOT, package, '**', '*.py'),
                          recursive=True):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = '.' * node.level + (node.module or '')
                yield (osp.relpath(path, ROOT), module,
                       [alias.name for alias in node.names])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield osp.relpath(path, ROOT), alias.name, []


def test_no_private_name_of_another_module():
    """Within mmdrq and mmdrq_runtime (third-party packages' private names,
    torch's ``_pytree``, are theirs to keep)."""
    private = [(path, module, name)
               for package in ('mmdrq', 'mmdrq_runtime')
               for path, module, names in imports(package)
               if module.startswith(('.', 'mmdrq'))
               for name in names
               if name.startswith('_') and not name.startswith('__')]
    assert private == []


def test_runtime_imports_no_torch_openmmlab_or_mmdrq():
    heavy = ('torch', 'torchvision', 'mmengine', 'mmcv', 'mmpretrain',
             'mmdet', 'mmseg', 'mmdrq')
    found = [(path, module) for path, module, _ in imports('mmdrq_runtime')
             if module.split('.')[0] in heavy]
    assert found == []


def test_no_module_over_450_lines():
    """A module that grows past this does several jobs: split it."""
    long = {}
    for package in ('mmdrq', 'mmdrq_runtime'):
        for path in glob.glob(osp.join(ROOT, package, '**', '*.py'),
                              recursive=True):
            with open(path) as f:
                count = sum(1 for _ in f)
            if count > 450:
                long[osp.relpath(path, ROOT)] = count
    assert long == {}
