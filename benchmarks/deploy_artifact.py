"""The export folder's size and a bit's session creation, one stored graph
(``--layout single``) against a full file per bit (``--layout per_bit``):
mmpretrain ResNet-18 at 224 px, {8, 6, 4, 2}, 1, 2 and 4 bits and the 4
bits with 2 SubNets, against one bit's file and the FP32 model.

    python benchmarks/deploy_artifact.py [--out-dir work_dirs/deploy_artifact]
        [--rounds 5] [--threads 1]

Random weights (sizes and load times do not depend on them). Session
creation is timed in turns, median of ``--rounds``: from the single folder
(the graph parsed once per folder, a setting rebuilt, its session made)
against ``make_session`` on the per-bit file. Writes
``deploy_artifact.md`` and ``.json``.
"""
import argparse
import json
import os
import os.path as osp
import shutil
import statistics
import time

from deploy import SIZE, build_resnet18, fp32_onnx, quantized_copy

from mmdrq.deploy import export_to_folder
from mmdrq.utils.atomic import atomic_write
from mmdrq_runtime import SwitchableSession, make_session

BITS = (8, 6, 4, 2)
CASES = {'1 bit': ((8, ), {}), '2 bits': ((8, 4), {}),
         '4 bits': (BITS, {}), '4 bits + 2 SubNets': (BITS, None)}


def subnets(model) -> dict:
    """Two SubNets: the first half of the quantized layers at 2 bits, or
    every other one at 4."""
    from mmdrq.quantization import quantized_layers
    names = list(quantized_layers(model))
    return {'half2': {n: 2 for n in names[:len(names) // 2]},
            'alternate4': {n: 4 for n in names[::2]}}


def folder_bytes(folder: str) -> int:
    return sum(osp.getsize(osp.join(folder, f)) for f in os.listdir(folder))


def session_times(single: str, per_bit: str, rounds: int,
                  threads: int) -> dict:
    """Median ms: opening the single folder (every SHA-256 checked, graph
    parsed), then each bit's session from it in turn (the first setting of
    each set of dropped Clips also rewrites the stored graph once, see
    ``SwitchableSession.session``), against a session from the bit's own
    file; and the totals for all bits."""
    times = {('single', b): [] for b in BITS}
    times.update({('per_bit', b): [] for b in BITS})
    times.update(open=[], single_total=[], per_bit_total=[])
    for _ in range(rounds):
        start = time.perf_counter()
        folder = SwitchableSession(single, threads)
        folder.export.graph()
        times['open'].append(time.perf_counter() - start)
        for bit in BITS:
            makers = {
                'single': lambda: folder.set_bits(bit).session(),
                'per_bit': lambda: make_session(
                    osp.join(per_bit, f'w{bit}a{bit}.onnx'), threads)}
            for layout in sorted(makers, reverse=len(times['open']) % 2):
                start = time.perf_counter()  # each first in every other round
                makers[layout]()
                times[(layout, bit)].append(time.perf_counter() - start)
        times['single_total'].append(times['open'][-1] + sum(
            times[('single', b)][-1] for b in BITS))
        times['per_bit_total'].append(sum(times[('per_bit', b)][-1]
                                          for b in BITS))
    return {(key if isinstance(key, str) else f'{key[0]}_w{key[1]}'):
            statistics.median(v) * 1e3 for key, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out-dir', default='work_dirs/deploy_artifact')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    model = build_resnet18()
    quantized = quantized_copy(model, BITS)
    shape = (1, 3, SIZE, SIZE)
    fp32 = len(fp32_onnx(model).SerializeToString())
    sizes, folders = {}, {}
    for case, (bits, nets) in CASES.items():
        nets = subnets(quantized) if nets is None else nets
        for layout in ('single', 'per_bit'):
            folder = osp.join(args.out_dir, f'{layout}_{len(bits)}_'
                              f'{len(nets)}')
            shutil.rmtree(folder, ignore_errors=True)
            export_to_folder(quantized, folder, bits, nets, shape,
                             layout=layout)
            sizes[(case, layout)] = folder_bytes(folder)
            folders[layout] = folder
    one = osp.getsize(osp.join(folders['per_bit'], 'w8a8.onnx'))
    load = session_times(folders['single'], folders['per_bit'], args.rounds,
                         args.threads)
    rows = ['| settings | one graph (vs one bit\'s file, vs FP32) | '
            'a file per setting (vs one bit\'s file, vs FP32) |',
            '|---|---|---|']
    for case in CASES:
        cells = [f'{sizes[(case, layout)] / 1e6:.2f} MB '
                 f'({sizes[(case, layout)] / one:.3f}, '
                 f'{sizes[(case, layout)] / fp32:.3f})'
                 for layout in ('single', 'per_bit')]
        rows.append(f'| {case} | ' + ' | '.join(cells) + ' |')
    rows += ['', '| session made (ms) | ' +
             ' | '.join(f'w{b}a{b}' for b in BITS) + ' | all bits |',
             '|---' * (len(BITS) + 2) + '|']
    for layout, label in (('single', 'from the one graph (rebuilt)'),
                          ('per_bit', 'from its own file')):
        rows.append(f'| {label} | ' + ' | '.join(
            f'{load[f"{layout}_w{b}"]:.0f}' for b in BITS) +
            f' | {load[f"{layout}_total"]:.0f} |')
    note = (f'Opening the folder (every SHA-256 checked, the graph parsed; '
            f'once per folder, in "all bits"): {load["open"]:.0f} ms. '
            f'ResNet-18, {SIZE} px; one bit\'s file {one / 1e6:.2f} MB, '
            f'FP32 {fp32 / 1e6:.2f} MB; {args.threads} thread(s), median '
            f'of {args.rounds} rounds in turns.')
    text = '\n'.join(rows) + f'\n\n{note}\n'
    atomic_write(osp.join(args.out_dir, 'deploy_artifact.md'),
                 lambda f: f.write(text.encode()))
    data = dict(sizes={f'{c} / {l}': v for (c, l), v in sizes.items()},
                one_bit_file=one, fp32_file=fp32, session_ms=load)
    atomic_write(osp.join(args.out_dir, 'deploy_artifact.json'),
                 lambda f: f.write(json.dumps(data, indent=1).encode()))
    print(text)


if __name__ == '__main__':
    main()
