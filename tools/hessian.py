"""Per-layer Hessian traces of a model, for HASB and the SubNet search.

    python tools/hessian.py CONFIG CKPT --out traces.json \
        [--num-samples 1000] [--max-probes 50] [--tol 1e-3] \
        [--split train|val] [--seed 0] [--cfg-options k=v ...]

Hutchinson's estimator through the model's own loss on batches of the
config's dataloader, at the highest bit, BN in eval mode; written as JSON
(atomically) that HASBHook and tools/search_subnet.py read.
"""
import argparse

import torch
from mmengine.config import DictAction
from mmengine.runner import Runner
from mmengine.utils import ProgressBar

import mmdrq  # noqa: F401 (registers mmdrq's modules)
from mmdrq.search.hessian import model_traces, save_traces
from mmdrq.tools_common import load_trained


def main():
    parser = argparse.ArgumentParser(description='Hessian traces per layer')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out', required=True)
    parser.add_argument('--num-samples', type=int, default=1000)
    parser.add_argument('--max-probes', type=int, default=50)
    parser.add_argument('--min-probes', type=int, default=4)
    parser.add_argument('--tol', type=float, default=1e-3)
    parser.add_argument('--split', choices=['train', 'val'], default='train')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    cfg, model, _ = load_trained(args.config, args.checkpoint,
                                 args.cfg_options)
    if torch.cuda.is_available():
        model = model.cuda()
    loader = Runner.build_dataloader(cfg[f'{args.split}_dataloader'],
                                     seed=args.seed)
    batches = -(-args.num_samples // loader.batch_size)
    bar = ProgressBar(min(batches, len(loader)))
    traces = model_traces(
        model, loader, num_samples=args.num_samples,
        max_probes=args.max_probes, min_probes=args.min_probes, tol=args.tol,
        generator=torch.Generator().manual_seed(args.seed),
        progress=lambda step: bar.update())
    save_traces(args.out, traces, dict(
        config=args.config, checkpoint=args.checkpoint,
        num_samples=args.num_samples, split=args.split, seed=args.seed))
    ranked = sorted(traces.items(), key=lambda kv: -kv[1]['trace_per_param'])
    print(f'\nwrote {args.out}; most sensitive layers:')
    for name, t in ranked[:5]:
        print(f'  {name}: {t["trace_per_param"]:.3e} per parameter')


if __name__ == '__main__':
    main()
