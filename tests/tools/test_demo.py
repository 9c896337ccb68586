"""tools/demo.py: the API tour runs and every reload is bit-exact."""
import os
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def test_demo_prints_a_bit_exact_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    done = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'demo.py'), '--bits', '4',
         '3', '2', '--batch', '2', '--work-dir', str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for bit in (4, 3, 2):
        row = [line for line in done.stdout.splitlines()
               if line.startswith(f'| w{bit}a{bit} |')]
        assert len(row) == 1 and row[0].rstrip().endswith('| yes |'), row
    assert osp.exists(tmp_path / 'resnet18_int.pth')
    assert 'stored (integers + scales)' in done.stdout
