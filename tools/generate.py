"""Generate text with a character language model (configs/language) at a
chosen bit-width, in PyTorch or from an ONNX export folder.

    python tools/generate.py CONFIG CKPT_OR_EXPORT_DIR [--bit 4]
        [--prompt TEXT] [--tokens 200] [--temperature 0] [--seed 0]
        [--kernels nbits|nbits_int8|exact] [--out FILE] [--cfg-options k=v ...]

CKPT_OR_EXPORT_DIR is a training checkpoint, an integer file
(tools/export_int.py) or an export folder (tools/export_onnx.py), which runs
in ONNX Runtime: ``--kernels nbits`` (default) as ``MatMulNBits`` with the
bit's packed weights (``nbits_int8``: with the input quantized to int8
per block when it runs, faster and not equal), ``exact`` as the folder's
QDQ graph. The vocabulary
is the config's test corpus'; each token is predicted from at most the
last ``block_size`` characters (the length the model was trained on):
PyTorch runs that window for every token, ONNX Runtime the exported
decoder step on its key-value cache.
``--out`` also writes the bit, prompt and text as JSON.
"""
import argparse
import os.path as osp

import torch

import mmdrq  # noqa: F401 (registers mmdrq's modules)
from mmdrq.tools_common import add_cfg_options, check_out_file
from mmdrq.utils import atomic_write_json
from mmdrq_runtime.generation import generate, generate_cached


def parse_args():
    parser = argparse.ArgumentParser(description='Generate text per bit')
    parser.add_argument('config')
    parser.add_argument('checkpoint', help='checkpoint, integer file or '
                        'export folder')
    parser.add_argument('--bit', type=int,
                        help='bit-width (default: the highest)')
    parser.add_argument('--prompt', default='The ')
    parser.add_argument('--tokens', type=int, default=200)
    parser.add_argument('--temperature', type=float, default=0.0,
                        help='0: the most likely character each time')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--kernels', default='nbits',
                        choices=['nbits', 'nbits_int8', 'exact'],
                        help='ONNX Runtime kernels (an export folder only)')
    parser.add_argument('--out', help='write {bit, prompt, text} as JSON')
    add_cfg_options(parser)
    return parser.parse_args()


def pytorch_logits(config: str, checkpoint: str, bit, cfg_options):
    """``logits(ids)`` of the checkpoint's model at ``bit``."""
    from mmdrq.deploy.pipeline import load_for_export
    from mmdrq.quantization import model_bits
    _, model = load_for_export(config, checkpoint, cfg_options)
    bit = model_bits(model)[0] if bit is None else bit
    mmdrq.set_bits(model, bit)

    def logits(ids):
        with torch.no_grad():
            return model(torch.from_numpy(ids), mode='tensor').numpy()
    return logits, bit


def onnx_step(folder: str, bit, kernels: str):
    """(decoder step ``(ids, keys, values) -> (logits, keys, values)`` of
    an export folder's session at ``bit``, its cache shape, the bit)."""
    from mmdrq_runtime.session import SwitchableSession
    session = SwitchableSession(folder, kernels=kernels)
    bit = session.available[0] if bit is None else bit
    session.set_bits(bit)

    def step(ids, keys, values):
        return session.run(ids, past_keys=keys, past_values=values)
    return step, session.meta['pipeline']['cache_shape'], bit


def main():
    args = parse_args()
    from mmdrq.apis import read_config
    from mmdrq.llm.corpus import read_vocab
    cfg = read_config(args.config, args.cfg_options)
    if args.out:
        check_out_file('--out', args.out, [args.config, args.checkpoint])
    if args.tokens < 0:
        raise ValueError(f'--tokens must be >= 0, got {args.tokens}')
    if args.temperature < 0:
        raise ValueError(f'--temperature must be >= 0, got '
                         f'{args.temperature}')
    dataset = cfg.test_dataloader.dataset
    vocab = read_vocab(dataset.data_root)
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(args.prompt) - set(index))
    if unknown:
        raise ValueError(f'--prompt has characters the corpus lacks: '
                         f'{unknown}')
    prompt = [index[c] for c in args.prompt]
    options = (args.tokens, dataset.block_size, args.temperature, args.seed)
    if osp.isdir(args.checkpoint):  # the exported step, on its cache
        step, cache_shape, bit = onnx_step(args.checkpoint, args.bit,
                                           args.kernels)
        ids = generate_cached(step, cache_shape, prompt, *options)
    else:
        logits, bit = pytorch_logits(args.config, args.checkpoint, args.bit,
                                     args.cfg_options)
        ids = generate(logits, prompt, *options)
    text = ''.join(vocab[i] for i in ids)
    print(f'[w{bit}] {args.prompt}{text}')
    if args.out:
        atomic_write_json(args.out, dict(bit=bit, prompt=args.prompt,
                                         text=text))


if __name__ == '__main__':
    main()
