"""Quantizer benchmark: throughput, eval overhead, bit switching, storage.

    python benchmarks/quantizer.py [--device cpu|cuda] [--quick]

Prints one markdown table per measurement and saves everything as JSON in
benchmarks/results/quantizer_<device>.json. Ratios are measured side by side
in one run, so they compare across machines better than absolute times.
"""
import argparse
import contextlib
import copy
import json
import os
import os.path as osp
import statistics
import tempfile
import time

import torch

import mmdrq
from mmdrq.quantization import DoubleRoundingQuantizer, shared_rounding
from mmdrq.quantization.functional import fake_quant_impl


def timeit(fn, device, repeat=10, warmup=3):
    """Median wall time of ``fn`` in seconds (synchronising on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_in_turns(steps: dict, device, repeat, warmup=2) -> dict:
    """Median seconds of each ``steps[name]()`` and, on CUDA, its peak
    memory above what was allocated before it. The steps run in turns (A,
    B, C, A, B, C, ...), so a busy machine's drift hits them alike and the
    ratios hold even when the absolute times wander."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    peaks = dict.fromkeys(steps, 0)
    for _ in range(repeat):
        for name, step in steps.items():
            if device.type == 'cuda':
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            step()
            if device.type == 'cuda':
                torch.cuda.synchronize()
                peaks[name] = max(peaks[name],
                                  torch.cuda.max_memory_allocated() - before)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), peaks[name])
            for name in steps}


def build(name):
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    depth = {'resnet18': 18, 'resnet50': 50}[name]
    return MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='ResNet', depth=depth),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=1000,
                  in_channels=512 if depth == 18 else 2048)))


def weight_and_quantizer(device, numel, bits):
    """A ``(numel / 1024, 1024)`` weight and its initialised quantizer."""
    weight = torch.randn(numel // 1024, 1024, device=device,
                         requires_grad=True)
    quantizer = DoubleRoundingQuantizer(bits, num_channels=weight.shape[0])
    quantizer.to(device)
    quantizer(weight, bits[0])  # initialise the scale outside the timing
    return weight, quantizer


def bench_fake_quant(device, numel, bits):
    """Weight fake-quant bandwidth as a fraction of a plain copy's, per
    implementation: ``torch`` (plain ops), ``fused`` (mmdrq's kernels, the
    eager default) and ``compiled`` (the quantizer call under
    torch.compile, as inside a compiled model).

    Bytes: a copy and the forward each read and write every element once;
    the backward reads the gradient and the weight and writes the weight's
    gradient, so forward+backward moves 5/2 of a copy's bytes.
    """
    weight, quantizer = weight_and_quantizer(device, numel, bits)
    grad = torch.randn_like(weight)
    target = torch.empty_like(weight)
    copy_time = timeit(lambda: target.copy_(weight.detach()), device,
                       repeat=30)
    rows = []
    for impl in ('torch', 'fused', 'compiled'):
        for bit in bits:
            # dynamic=False: bits stay constants, as module attributes do
            run = (torch.compile(lambda w, b=bit: quantizer(w, b),
                                 dynamic=False)
                   if impl == 'compiled' else lambda w, b=bit: quantizer(w, b))

            def fwd_bwd():
                weight.grad = quantizer.scale.grad = None
                run(weight).backward(grad)
            with fake_quant_impl('torch' if impl == 'torch' else 'auto'):
                fwd = timeit(lambda: run(weight.detach()), device, repeat=30)
                both = timeit(fwd_bwd, device, repeat=30)
            rows.append(dict(impl=impl, bit=bit, fwd_ms=fwd * 1e3,
                             fwd_bwd_ms=both * 1e3, copy_ms=copy_time * 1e3,
                             fwd_vs_copy=copy_time / fwd,
                             fwd_bwd_vs_copy=2.5 * copy_time / both))
    return rows


def bench_summed_weights(device, numel, bits):
    """Every bit's weight forward and one backward, as a summed loss over
    the bits needs: one call per bit against one call for all bits
    (``shared_rounding``, what ``loss_mode='sum'`` uses)."""
    weight, quantizer = weight_and_quantizer(device, numel, bits)
    grads = [torch.randn_like(weight) for _ in bits]

    def run(share):
        weight.grad = quantizer.scale.grad = None
        with shared_rounding(quantizer) if share \
                else contextlib.nullcontext():
            outs = [quantizer(weight, bit) for bit in bits]
        torch.autograd.backward(outs, grads)
    rows = []
    for share in (False, True):
        t = timeit(lambda: run(share), device, repeat=20)
        rows.append(dict(rounding='shared' if share else 'per bit',
                         fwd_bwd_ms=t * 1e3))
    for row in rows:
        row['vs_per_bit'] = row['fwd_bwd_ms'] / rows[0]['fwd_bwd_ms']
    return rows


def bench_eval(device, bits, batch, size):
    """Eval forward at each bit (cached integer weights) / FP forward."""
    fp = build('resnet18').to(device).eval()
    model = mmdrq.quantize_model(copy.deepcopy(fp), bits=bits).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    wq_only = mmdrq.quantize_model(copy.deepcopy(fp), bits=bits,
                                   act_quantizer=None).eval()

    steps = {'FP': lambda: fp(x, mode='tensor')}
    for bit in bits:  # a copy per bit: each keeps its cached weights
        at_bit = mmdrq.set_bits(copy.deepcopy(model), bit)
        steps[bit] = lambda at_bit=at_bit: at_bit(x, mode='tensor')
    steps[f'{bits[0]} (weights only)'] = lambda: wq_only(x, mode='tensor')
    with torch.no_grad():
        timings = timed_in_turns(steps, device, repeat=10)
    fp_time = timings.pop('FP')[0]
    rows = [dict(bit=bit, fp_ms=fp_time * 1e3, q_ms=t * 1e3,
                 ratio=t / fp_time) for bit, (t, _) in timings.items()]
    return rows


def bench_switch(device, bits):
    """set_bits on ResNet-50: attribute writes only."""
    model = mmdrq.quantize_model(build('resnet50').to(device), bits=bits)
    count = sum(1 for m in model.modules()
                if isinstance(m, mmdrq.quantization.BitSwitchable))
    cycle = list(bits)
    state = {'i': 0}

    def switch():
        state['i'] += 1
        mmdrq.set_bits(model, cycle[state['i'] % len(cycle)])
    if device.type == 'cuda':
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    t = timeit(switch, device, repeat=200, warmup=10)
    allocated = (torch.cuda.memory_allocated() - before
                 if device.type == 'cuda' else 0)
    return dict(modules=count, switch_ms=t * 1e3, allocated_bytes=allocated)


def bench_storage():
    """Integer checkpoint sizes of ResNet-18 at h=8 and h=4."""
    rows = []
    fp = build('resnet18')
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = osp.join(tmp, 'fp32.pth')
        torch.save(fp.state_dict(), fp_path)
        for bits in ([8, 6, 4, 2], [4, 3, 2]):
            model = mmdrq.quantize_model(copy.deepcopy(fp), bits=bits)
            path = osp.join(tmp, 'int.pth')
            sizes = mmdrq.save_int(model, path)
            stored = sizes['int_bytes'] + sizes['scale_bytes']
            rows.append(dict(
                bits=str(bits), layers_ratio=stored / sizes['fp32_bytes'],
                file_bytes=os.path.getsize(path),
                fp32_file_bytes=os.path.getsize(fp_path),
                file_ratio=os.path.getsize(path) / os.path.getsize(fp_path)))
    return rows


def table(title, rows):
    keys = list(rows[0])
    lines = [f'\n### {title}\n', '| ' + ' | '.join(keys) + ' |',
             '|' + '|'.join('---' for _ in keys) + '|']
    for row in rows:
        cells = [f'{v:.3f}' if isinstance(v, float) else str(v)
                 for v in row.values()]
        lines.append('| ' + ' | '.join(cells) + ' |')
    print('\n'.join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda'
                        if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--quick', action='store_true',
                        help='small sizes (smoke test)')
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    bits = [8, 6, 4, 2]
    gpu = device.type == 'cuda'
    numel = (1 << 16) if args.quick else ((1 << 26) if gpu else (1 << 22))
    batch, size = (2, 64) if args.quick else ((64, 224) if gpu else (4, 160))
    results = dict(device=str(device), torch=torch.__version__,
                   name=torch.cuda.get_device_name() if gpu else 'cpu',
                   threads=torch.get_num_threads())
    results['fake_quant'] = bench_fake_quant(device, numel, bits)
    table(f'weight fake-quant, {numel:,} elements: bandwidth / copy\'s',
          results['fake_quant'])
    results['summed'] = bench_summed_weights(device, numel, bits)
    table(f'weights of {bits} forward + one backward (summed loss), '
          f'{numel:,} elements', results['summed'])
    results['eval'] = bench_eval(device, bits, batch, size)
    table(f'ResNet-18 eval forward, batch {batch}x{size}px: quantized / FP',
          results['eval'])
    results['switch'] = bench_switch(device, bits)
    table('ResNet-50 bit switch (set_bits)', [results['switch']])
    results['storage'] = bench_storage()
    table('ResNet-18 integer checkpoint size', results['storage'])
    out = osp.join(osp.dirname(osp.abspath(__file__)), 'results',
                   f'quantizer_{device.type}{"_quick" if args.quick else ""}'
                   '.json')
    os.makedirs(osp.dirname(out), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(results, f, indent=1)
    print(f'\nsaved {out}')


if __name__ == '__main__':
    main()
