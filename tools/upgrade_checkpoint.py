"""Give a QAT checkpoint of an earlier mmdrq the bit list it lacks.

    python tools/upgrade_checkpoint.py CONFIG CKPT OUT --assume-bits 8 6 4 2

Checkpoints written before mmdrq stored the bit list and quantizer options
(``_extra_state``) are refused by tools/test.py, the export tools and
``--resume``: their scales have the same shapes under any bit list, so a
wrong one would load silently. If you know the bits CKPT was trained with,
say them: they must be the config's, every other key and shape must fit the
config's model exactly, and OUT (a new file, written atomically; CKPT is
left as it is) then holds the config's bit list and options and the
SHA-256 digests of its tensors, and loads like a current checkpoint.
"""
import argparse
import os


from mmdrq.apis import build_model_from_config, read_config
from mmdrq.tools_common import add_cfg_options
from mmdrq.engine.checkpoint_hook import STATE_DIGEST
from mmdrq.engine.strict_load import EXTRA_STATE, check_checkpoint
from mmdrq.quantization import model_bits
from mmdrq.utils import atomic_torch_save, load_weights_only
from mmdrq.utils.digest import tensor_digests


def upgrade(config: str, checkpoint: str, out: str, bits, cfg_options=None):
    """Write OUT: CKPT with the config's bit list, which must be ``bits``."""
    if os.path.exists(out):
        raise FileExistsError(f'OUT {out!r} exists: choose a new file (CKPT '
                              'is never replaced)')
    cfg = read_config(config, cfg_options)
    model, _ = build_model_from_config(cfg)
    if EXTRA_STATE not in model.state_dict():
        raise ValueError(f'the model of {config!r} is not mmdrq\'s QAT '
                         'wrapper, which records the bit list: its '
                         'checkpoints load as they are')
    if list(bits) != list(model_bits(model)):
        raise ValueError(f'--assume-bits {list(bits)} is not the config\'s '
                         f'bit list {list(model_bits(model))}: a checkpoint '
                         'is tested with the bits of the config it was '
                         'trained with')
    loaded = load_weights_only(checkpoint)
    state = loaded.get('state_dict', loaded) if isinstance(loaded, dict) \
        else None
    if not isinstance(state, dict):
        raise ValueError(f'checkpoint {checkpoint!r} holds no state dict')
    if EXTRA_STATE in state:
        raise ValueError(f'checkpoint {checkpoint!r} already records its bit '
                         'list: nothing to upgrade')
    state[EXTRA_STATE] = model.state_dict()[EXTRA_STATE]
    check_checkpoint(model, loaded, f'checkpoint {checkpoint!r}')
    if 'state_dict' in loaded:
        loaded.setdefault('meta', {})[STATE_DIGEST] = tensor_digests(
            state.items())
    atomic_torch_save(loaded, out)


def main():
    parser = argparse.ArgumentParser(
        description='Record the bit list in a checkpoint of an earlier mmdrq')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('out')
    parser.add_argument('--assume-bits', type=int, nargs='+', required=True,
                        help='the bits CKPT was trained with (the config\'s)')
    add_cfg_options(parser)
    args = parser.parse_args()
    upgrade(args.config, args.checkpoint, args.out, args.assume_bits,
            args.cfg_options)
    print(f'{args.out}: {args.checkpoint} with bits={args.assume_bits} '
          'recorded')


if __name__ == '__main__':
    main()
