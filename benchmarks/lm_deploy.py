"""ONNX Runtime latency per generated token of the character Llama at each
bit (``MatMulNBits``, one export folder) against its FP32 graph, batch 1,
and the files' sizes.

    python benchmarks/lm_deploy.py [--checkpoint CKPT] [--widths 128 1024]
        [--threads 1] [--tokens 32] [--quick]

Width 128 is the config's model (the trained checkpoint's weights with
``--checkpoint``, else the converted model with scales from one batch);
wider ones are the same architecture made wider (4 layers, MLP 2.75x, one
head per 64 channels), converted and given scales from one random batch:
latency depends on the shapes, not on the values. Generation is greedy,
the whole window run again per token (the graph has no key-value cache),
from a 32-token prompt. Settings are timed in turns. Writes
``benchmarks/results/lm_deploy.{md,json}``.
"""
import argparse
import os
import os.path as osp
import tempfile
import time

import numpy as np
import torch

import mmdrq  # noqa: F401 (registers mmdrq's modules)
import mmdrq.llm  # noqa: F401 (registers the language model)
from mmdrq.deploy.pipeline import export_to_folder
from mmdrq.utils import atomic_write, atomic_write_json
from mmdrq_runtime.generation import generate_cached
from mmdrq_runtime.nbits import matmul_nbits
from mmdrq_runtime.session import SwitchableSession, make_session

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', 'language', 'llama_char_drq-8642.py')
BITS = (8, 6, 4, 2)
PROMPT = 32


def build(width: int, checkpoint=None):
    """The converted LM of the QAT config at ``width`` (scales from one
    random batch), or the checkpoint's model at the config's width."""
    from mmdrq.apis import build_model_from_config, read_config
    from mmdrq.deploy.pipeline import load_for_export
    if checkpoint:
        return load_for_export(CONFIG, checkpoint)[1]
    cfg = read_config(CONFIG)
    config = cfg.model.architecture.config
    if width != config.hidden_size:
        config.update(hidden_size=width, intermediate_size=width * 11 // 4,
                      num_attention_heads=width // 64,
                      num_key_value_heads=width // 64)
    torch.manual_seed(0)
    _, model = build_model_from_config(cfg)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (2, 64)), mode='tensor')
    return model.eval()


KERNELS = ('nbits', 'nbits_int8')


def sessions(model, folder: str, threads: int):
    """The FP32 graph's session and each bit's for each of ``KERNELS``,
    by name; the files' sizes; the folder's meta."""
    from mmdrq.deploy.onnx_export import OnnxExporter
    meta = export_to_folder(model, folder, list(BITS), input_shape=(1, 64),
                            graph='tensor')
    fp32 = OnnxExporter(model, (1, 64)).skeleton()  # float weights
    found = {'FP32': make_session(fp32, threads, 'exact')}
    for kernels in KERNELS:
        for bit in BITS:
            session = SwitchableSession(folder, threads, kernels)
            found[f'w{bit} {kernels}'] = session.set_bits(bit).session()
    sizes = dict(fp32=len(fp32.SerializeToString()),
                 folder=sum(osp.getsize(osp.join(folder, f))
                            for f in os.listdir(folder)))
    export = SwitchableSession(folder).export
    for bit in BITS:  # one packed file per bit, for comparison
        sizes[f'packed_w{bit}'] = len(matmul_nbits(
            export.model(bit)).SerializeToString())
    return found, sizes, meta


def timed_generation(session, cache_shape, vocab: int, count: int) -> float:
    """Seconds to generate ``count`` tokens greedily on the exported step's
    key-value cache after a ``PROMPT``-token prompt (its prefill included)."""
    feeds = [i.name for i in session.get_inputs()]
    prompt = list(np.random.default_rng(0).integers(0, vocab, PROMPT))

    def step(ids, keys, values):
        return session.run(None, dict(zip(feeds, (ids, keys, values))))
    start = time.perf_counter()
    generate_cached(step, cache_shape, prompt, count, PROMPT + count)
    return time.perf_counter() - start


def measure(found: dict, cache_shape, vocab: int, tokens: int,
            rounds: int) -> dict:
    """Per setting the prefill (the prompt's step, ms) and the milliseconds
    per generated token after it, each the best of ``rounds`` turns (each
    setting once per turn, after one warm-up)."""
    times = {name: dict(prefill=[], token=[]) for name in found}
    for session in found.values():
        timed_generation(session, cache_shape, vocab, 2)
    for _ in range(rounds):
        for name, session in found.items():
            prefill = timed_generation(session, cache_shape, vocab, 1)
            total = timed_generation(session, cache_shape, vocab, tokens + 1)
            times[name]['prefill'].append(prefill * 1e3)
            times[name]['token'].append((total - prefill) / tokens * 1e3)
    return {name: {kind: min(values) for kind, values in kinds.items()}
            for name, kinds in times.items()}


def markdown(rows: list, threads: int, tokens: int) -> str:
    lines = [f'ONNX Runtime (CPU, {threads} thread(s)), batch 1, greedy '
             'generation on the exported decoder step\'s key-value cache: '
             f'*token*: milliseconds per generated token ({tokens} tokens), '
             f'*prefill*: milliseconds of the {PROMPT}-token prompt\'s step. '
             'Best of the turns; ratio to FP32 in brackets. `nbits`: '
             'MatMulNBits on float input (equal to PyTorch); `nbits_int8`: '
             'its input quantized to int8 per block at run time.', '',
             '| width (parameters) | kernels | kind | FP32 ms | w8 | w6 | '
             'w4 | w2 |', '|---|---|---|---|---|---|---|---|']
    for row in rows:
        ms = row['ms']
        for kernels in KERNELS:
            for kind in ('token', 'prefill'):
                fp = ms['FP32'][kind]
                cells = [f'{ms[f"w{b} {kernels}"][kind]:.2f} '
                         f'({ms[f"w{b} {kernels}"][kind] / fp:.2f}x)'
                         for b in BITS]
                lines.append(f'| {row["width"]} ({row["parameters"] / 1e6:.2f}'
                             f' M) | {kernels} | {kind} | {fp:.2f} | ' +
                             ' | '.join(cells) + ' |')
    lines += ['', 'Files against the FP32 graph: the export folder (one '
              'graph with the 8-bit integers, serving every bit) and one '
              'packed MatMulNBits file per bit.', '',
              '| width | FP32 MB | folder | packed w8 | w6 | w4 | w2 |',
              '|---|---|---|---|---|---|---|']
    for row in rows:
        sizes = row['sizes']
        cells = [f'{sizes[k] / sizes["fp32"]:.2f}' for k in
                 ['folder'] + [f'packed_w{b}' for b in BITS]]
        lines.append(f'| {row["width"]} | {sizes["fp32"] / 2**20:.1f} | ' +
                     ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--checkpoint', help='the QAT checkpoint (width 128)')
    parser.add_argument('--widths', type=int, nargs='+', default=[128, 1024])
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--tokens', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--quick', action='store_true')
    args = parser.parse_args()
    if args.quick:
        args.widths, args.tokens, args.rounds = [128], 4, 1
    rows = []
    for width in args.widths:
        model = build(width, args.checkpoint if width == 128 else None)
        with tempfile.TemporaryDirectory() as tmp:
            found, sizes, meta = sessions(model, osp.join(tmp, 'onnx'),
                                          args.threads)
            ms = measure(found, meta['pipeline']['cache_shape'],
                         model.vocab_size, args.tokens, args.rounds)
        rows.append(dict(width=width, parameters=sum(
            p.numel() for p in model.parameters()), ms=ms, sizes=sizes,
            probe=[s['probe'] for s in meta['settings']]))
        print(rows[-1])
    text = markdown(rows, args.threads, args.tokens)
    print(text)
    if not args.quick:
        out = osp.join(ROOT, 'benchmarks', 'results', 'lm_deploy')
        atomic_write_json(out + '.json', dict(
            threads=args.threads, tokens=args.tokens, prompt=PROMPT,
            torch=torch.__version__, rows=rows))
        atomic_write(out + '.md', lambda f: f.write(text.encode()))


if __name__ == '__main__':
    main()
