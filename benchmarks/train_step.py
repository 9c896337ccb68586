"""Training-step cost of quantization: FP vs each bit vs a multi-precision
iteration, for mmpretrain's ResNet-18, measured side by side in one run.

    python benchmarks/train_step.py [--device cpu|cuda] [--batch N]
        [--size PX] [--compile] [--impl auto|torch|fused] [--quick]
        [--profile]

GPU runs use bf16 autocast. Prints a table of step times and the ratios of
issue 6 (per-bit step / FP step, multi-precision iteration / (n x FP step),
peak memory allocated in a step per bit / FP), and a summed-loss iteration
with and without sharing the weights' rounding between bits, and saves JSON
in benchmarks/results/. Eager CPU runs of the fused path also time a 4-bit
step, an iteration and a 4-bit eval forward with the fake-quant kernels that
Inductor compiles (the CPU's kernels before the C++ ones; CUDA's now), in
the same turns. ``--profile`` also prints where a 4-bit step's time goes
beyond an FP step's, by kind of work (the profiler's self times).
"""
import argparse
import contextlib
import copy
import functools
import json
import os.path as osp
import tempfile
import warnings

import torch

import mmdrq
from mmdrq.models import MultiPrecisionQAT
from mmdrq.quantization import fused_kernels, shared_rounding
from mmdrq.quantization.functional import IMPLS, set_fake_quant_impl
from mmdrq.utils import atomic_write_json
from quantizer import build, timed_in_turns  # benchmarks/quantizer.py

BITS = (8, 6, 4, 2)


# profiler event names -> the kind of work they are, in the breakdown
KINDS = (
    ('fake-quant kernels (Inductor)', ('CompiledFxGraph', )),
    ('fake-quant autograd functions (Python; the CPU\'s C++ kernels)',
     ('_FakeQuant', )),
    ('compiled-kernel guards and calls', ('TorchDynamo', 'Torch-Compiled')),
    ('conv backward', ('convolution_backward', )),
    ('conv forward', ('mkldnn_convolution', 'aten::convolution',
                      'aten::_convolution', 'cudnn_convolution')),
    ('backward node of a quantized layer (recomputes its inputs)',
     ('ConvolutionBackward0', 'AddmmBackward0', 'MmBackward0')),
)


def breakdown(step, repeat: int = 3) -> dict:
    """Self CPU milliseconds per step of ``step()`` by ``KINDS`` (the rest
    under 'other')."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeat):
            step()
    kinds = {kind: 0.0 for kind, _ in KINDS}
    kinds['other'] = 0.0
    for event in prof.key_averages():
        kind = next((k for k, names in KINDS
                     if any(n in event.key for n in names)), 'other')
        kinds[kind] += event.self_cpu_time_total / 1e3 / repeat
    return kinds


@contextlib.contextmanager
def inductor_cpu_kernels():
    """The CPU's fake-quant calls on Inductor's compiled kernels for a
    ``with`` block (benchmark only: the C++ ones are the CPU's kernels)."""
    cpp = fused_kernels._kernels.get('cpu')
    fused_kernels._kernels['cpu'] = _inductor_kernels()
    try:
        yield
    finally:
        fused_kernels._kernels['cpu'] = cpp


@functools.lru_cache(maxsize=None)
def _inductor_kernels():
    return fused_kernels.InductorKernels()


def cpu_peak_bytes(step):
    """Peak CPU bytes allocated during ``step()`` above what was live when
    it started, from the profiler's memory timeline (torch has no CPU
    counterpart of ``torch.cuda.max_memory_allocated``)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                 record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # deprecated, works
        path = osp.join(folder, 'timeline.json')
        prof.export_memory_timeline(path, device='cpu')
        with open(path) as f:
            _, sizes = json.load(f)
    totals = [sum(categories) for categories in sizes]
    return max(totals) - totals[0]


@contextlib.contextmanager
def activations_replaced(replace):
    """Every activation quantizer returns ``replace(x)`` instead of its
    fake-quantized input (the eval breakdown's rows)."""
    from mmdrq.quantization.act_quantizer import ActQuantizer
    forward = ActQuantizer.forward
    ActQuantizer.forward = lambda self, x, bit: replace(x)
    try:
        yield
    finally:
        ActQuantizer.forward = forward


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda'
                        if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch', type=int)
    parser.add_argument('--size', type=int)
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the network (both FP and QAT)')
    parser.add_argument('--impl', default='auto', choices=IMPLS,
                        help='fake-quant implementation (eager runs)')
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--profile', action='store_true',
                        help='print where a 4-bit step spends the time an '
                        'FP step does not')
    args = parser.parse_args()
    set_fake_quant_impl(args.impl)
    device = torch.device(args.device)
    gpu = device.type == 'cuda'
    batch = args.batch or (256 if gpu else (2 if args.quick else 8))
    size = args.size or (224 if gpu else (64 if args.quick else 112))
    repeat = 3 if args.quick else 10
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch, ), device=device)
    autocast = torch.autocast('cuda', torch.bfloat16) if gpu \
        else contextlib.nullcontext()

    fp = build('resnet18').to(device).train()
    qat = MultiPrecisionQAT(copy.deepcopy(fp), dict(bits=list(BITS)),
                            compile=args.compile)
    qat = qat.to(device).train()
    run_fp = torch.compile(fp) if args.compile else fp
    opt_fp = torch.optim.SGD(fp.parameters(), lr=1e-3)
    opt_q = torch.optim.SGD(qat.parameters(), lr=1e-3)

    def step(model, opt):
        with autocast:
            logits = model(x, mode='tensor')
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # one real training iteration first: it initialises the scales and
    # notes the layers' calls, after which compile=True takes over
    from mmengine.optim import OptimWrapper
    from mmpretrain.structures import DataSample
    qat.train_step(dict(inputs=x, data_samples=[
        DataSample().set_gt_label(int(label)) for label in y]),
        OptimWrapper(opt_q))

    def at_bit(bit):
        def run():
            mmdrq.set_bits(qat.architecture, bit)
            step(qat, opt_q)
        return run

    def multi():
        for bit in BITS:
            at_bit(bit)()

    def summed(share):  # loss_mode='sum': one step on the bits' summed loss
        sharing = shared_rounding(qat.architecture) if share \
            else contextlib.nullcontext()
        total = 0
        with autocast, sharing:
            for bit in BITS:
                mmdrq.set_bits(qat.architecture, bit)
                logits = qat(x, mode='tensor')
                total = total + torch.nn.functional.cross_entropy(
                    logits.float(), y)
        total.backward()
        opt_q.step()
        opt_q.zero_grad(set_to_none=True)

    steps = {'FP': lambda: step(run_fp, opt_fp)}
    steps.update((f'w{bit}a{bit}', at_bit(bit)) for bit in BITS)
    single_steps = set(steps)  # the rest run every bit: vs n x FP
    steps[f'multi-precision {list(BITS)}'] = multi
    # in-process before/after: Inductor's kernels on the CPU
    inductor = device.type == 'cpu' and not args.compile and \
        args.impl != 'torch'
    if inductor:
        def with_inductor(run):
            def wrapped():
                with inductor_cpu_kernels():
                    run()
            return wrapped
        steps['w4a4, Inductor kernels'] = with_inductor(at_bit(4))
        single_steps.add('w4a4, Inductor kernels')
        steps[f'multi-precision {list(BITS)}, Inductor kernels'] = \
            with_inductor(multi)
    for share in (False, True):
        steps[f'summed loss {list(BITS)}, {"shared" if share else "per-bit"}'
              f' weight rounding'] = lambda share=share: summed(share)
    eval_model = mmdrq.set_bits(copy.deepcopy(qat.architecture).eval(), 4)
    fp_eval = copy.deepcopy(fp).eval()

    def forward(model):
        with torch.no_grad(), autocast:
            model(x, mode='tensor')
    eval_steps = {'FP': lambda: forward(fp_eval),
                  'w4a4': lambda: forward(eval_model)}
    if inductor:
        def eval_inductor():
            with inductor_cpu_kernels():
                forward(eval_model)
        eval_steps['w4a4, Inductor kernels'] = eval_inductor
    # what the activation quantizers cost: none at all, or a plain copy of
    # each input in their place (the least a quantized input can cost)
    for label, replace in (('activations not quantized', lambda x: x),
                           ('activations copied, not quantized',
                            torch.clone)):
        def eval_replaced(replace=replace):
            with activations_replaced(replace):
                forward(eval_model)
        eval_steps[f'w4a4, {label}'] = eval_replaced
    timings = timed_in_turns(steps, device, repeat)
    eval_times = timed_in_turns(eval_steps, device, repeat)
    fp_time, fp_mem = timings['FP']
    if not gpu:
        fp_mem = cpu_peak_bytes(steps['FP'])
    rows = []
    for name, (t, mem) in timings.items():
        per_step = name in single_steps
        if per_step and not gpu:
            mem = cpu_peak_bytes(steps[name])
        rows.append(dict(
            setting=name, ms=t * 1e3,
            ratio=t / (fp_time if per_step else len(BITS) * fp_time),
            peak_mb=mem / 2**20 if per_step else None,
            mem_ratio=mem / fp_mem if per_step else None))

    mode = 'compiled' if args.compile else f'eager-{args.impl}'
    print(f'\nResNet-18 train step, {device}, batch {batch} x {size}px, '
          f'{mode}{", bf16 autocast" if gpu else ""}\n')
    print('| setting | ms | vs FP (multi: vs n x FP) | peak MB in the step '
          '| vs FP |')
    print('|---|---|---|---|---|')

    def cell(value, fmt):
        return '-' if value is None else format(value, fmt)
    for r in rows:
        print(f'| {r["setting"]} | {r["ms"]:.1f} | {r["ratio"]:.2f} | '
              f'{cell(r["peak_mb"], ".1f")} | {cell(r["mem_ratio"], ".2f")} |')
    print('\neval forward at a fixed bit (cached weights)\n')
    print('| setting | ms | vs FP |')
    print('|---|---|---|')
    eval_rows = [dict(setting=name, ms=t * 1e3,
                      ratio=t / eval_times['FP'][0])
                 for name, (t, _) in eval_times.items()]
    for r in eval_rows:
        print(f'| {r["setting"]} | {r["ms"]:.1f} | {r["ratio"]:.2f} |')
    if args.profile:
        fp_kinds, q_kinds = breakdown(steps['FP']), breakdown(at_bit(4))
        print('\nwhere the time goes (self CPU ms per step, profiler): '
              'FP step, w4a4 step, the difference\n')
        print('| kind of work | FP | w4a4 | w4a4 - FP |')
        print('|---|---|---|---|')
        for kind in q_kinds:
            print(f'| {kind} | {fp_kinds[kind]:.1f} | {q_kinds[kind]:.1f} | '
                  f'{q_kinds[kind] - fp_kinds[kind]:+.1f} |')
        total = [sum(k.values()) for k in (fp_kinds, q_kinds)]
        print(f'| total | {total[0]:.1f} | {total[1]:.1f} | '
              f'{total[1] - total[0]:+.1f} |')
    out = osp.join(osp.dirname(osp.abspath(__file__)), 'results',
                   f'train_step_{device.type}_{mode}'
                   f'{"_quick" if args.quick else ""}.json')
    atomic_write_json(out, dict(device=str(device), batch=batch, size=size,
                                mode=mode, torch=torch.__version__,
                                threads=torch.get_num_threads(), rows=rows,
                                eval_rows=eval_rows))
    print(f'\nsaved {out}')


if __name__ == '__main__':
    main()
