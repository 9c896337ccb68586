"""Per-layer Hessian traces of a model, for HASB and the SubNet search.

    python tools/hessian.py CONFIG CKPT --out traces.json \
        [--num-samples 1000] [--max-probes 10] [--min-probes 2] \
        [--tol 1e-3] [--joint] [--split train|val] [--seed 0] \
        [--cfg-options k=v ...]

CONFIG is an mmdrq config (the QAT wrapper, or a plain model plus a
top-level ``quantizer``). CKPT is a checkpoint of it, or an FP32 checkpoint
of the bare model: the quantizer scales it lacks are initialised from the
first batch. Hutchinson's estimator runs through the model's own loss on the
first batches of the config's dataloader, at the highest bit, BN in eval
mode; the JSON (written atomically) is what HASBHook and
tools/search_subnet.py read.
"""
import argparse

import torch
from mmengine.runner import CheckpointLoader, Runner, set_random_seed
from mmengine.utils import ProgressBar

import mmdrq  # noqa: F401 (registers mmdrq's modules)
from mmdrq.quantization import model_bits
from mmdrq.search.hessian import HVP_METHODS, model_traces, save_traces
from mmdrq.apis import build_model_from_config, read_config
from mmdrq.tools_common import add_cfg_options, check_out_file
from mmdrq.engine.checkpoint_hook import (check_state_digest,
                                          check_training_checkpoint)

# state an FP32 checkpoint lacks (MultiPrecisionQAT's bits and options too)
QUANTIZER_STATE = ('weight_quantizer.', 'act_quantizer.', '_extra_state')


def load_weights(model, path: str) -> bool:
    """Load ``path`` into ``model``; True if it had no quantizer state.

    Missing quantizer state is allowed (an FP32 checkpoint of the bare
    model); any other missing or unexpected key means a checkpoint of
    another model. A strict load would refuse FP32 checkpoints, a lax one
    would accept anything.
    """
    check_training_checkpoint(path, 'give the training checkpoint it came '
                              'from')
    checkpoint = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    check_state_digest(checkpoint, path)
    state = checkpoint.get('state_dict', checkpoint)
    state = {k[len('module.'):] if k.startswith('module.') else k: v
             for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys
               if not any(s in k for s in QUANTIZER_STATE)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f'checkpoint {path!r} does not fit the config\'s model: missing '
            f'{missing[:5]}, unexpected {result.unexpected_keys[:5]}')
    return len(result.missing_keys) > 0


def parse_args():
    parser = argparse.ArgumentParser(description='Hessian traces per layer')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out', required=True, help='traces JSON to write')
    parser.add_argument('--num-samples', type=int, default=1000)
    parser.add_argument('--max-probes', type=int, default=10,
                        help='probes per batch at most')
    parser.add_argument('--min-probes', type=int, default=2)
    parser.add_argument('--tol', type=float, default=1e-3)
    parser.add_argument('--joint', action='store_true',
                        help='one Hessian-vector product per probe for all '
                        'layers: cheaper, far noisier per layer')
    parser.add_argument('--hvp', choices=HVP_METHODS, default='auto',
                        help='Hessian-vector products by double backward, '
                        'by finite differences of gradients, or (auto) the '
                        'latter only for once-differentiable ops (DCN)')
    parser.add_argument('--split', choices=['train', 'val'], default='train')
    parser.add_argument('--seed', type=int, default=0)
    add_cfg_options(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    check_out_file('--out', args.out, [args.config, args.checkpoint])
    cfg = read_config(args.config, args.cfg_options)
    key = f'{args.split}_dataloader'
    if cfg.get(key) is None:
        raise KeyError(f'config {args.config!r} has no {key!r}')
    model, architecture = build_model_from_config(cfg)
    from_fp32 = load_weights(model, args.checkpoint)
    if torch.cuda.is_available():
        model = model.cuda()
    # the pipeline's random augmentations draw from the global generators:
    # seeded, so that --seed repeats the traces
    set_random_seed(args.seed)
    loader = Runner.build_dataloader(cfg[key], seed=args.seed)

    bar = []

    def progress(step, total):
        if not bar:
            bar.append(ProgressBar(total or 0))
        bar[0].update()

    traces = model_traces(
        model, loader, num_samples=args.num_samples,
        max_probes=args.max_probes, min_probes=args.min_probes, tol=args.tol,
        generator=torch.Generator().manual_seed(args.seed),
        progress=progress, per_tensor=not args.joint, hvp=args.hvp)
    save_traces(args.out, traces, dict(
        config=args.config, checkpoint=args.checkpoint,
        fp32_checkpoint=from_fp32, bit=model_bits(architecture)[0],
        split=args.split, num_samples=args.num_samples,
        max_probes=args.max_probes, min_probes=args.min_probes,
        tol=args.tol, per_tensor=not args.joint, seed=args.seed,
        hvp=next(iter(traces.values()))['hvp']),
        model=model)
    ranked = sorted(traces.items(), key=lambda kv: -kv[1]['trace_per_param'])
    probes = next(iter(traces.values()))['probes']
    print(f'\nwrote {args.out}: {len(traces)} layers, {probes} probes in '
          'all; most sensitive layers:')
    for name, t in ranked[:5]:
        print(f'  {name}: {t["trace_per_param"]:.3e} per parameter')


if __name__ == '__main__':
    main()
