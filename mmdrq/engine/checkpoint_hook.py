"""Checkpoints that survive a kill: written atomically, replaced in order,
and found again by ``--resume``.

MMEngine's ``CheckpointHook`` deletes the oldest kept checkpoint (and the
previous best one) before it writes the new one, writes it in place and
rewrites ``last_checkpoint`` in place: a kill at the wrong moment leaves half
a file, with ``max_keep_ckpts=1`` no complete checkpoint at all, and a
``last_checkpoint`` naming a deleted file.
"""
import logging
import os
import os.path as osp
import re
from typing import Optional

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend, get_file_backend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log

from mmdrq.registry import HOOKS
from mmdrq.utils import (UnsafeCheckpointError, atomic_write,
                         load_weights_only)
from mmdrq.utils.digest import first_changed, tensor_digests

ATOMIC_BACKEND = 'mmdrq_atomic_local'
STATE_DIGEST = 'mmdrq_state_dict_sha256'
# what atomic_write leaves of a checkpoint or last_checkpoint when the
# process dies while writing it
_TEMPORARY = re.compile(r'^\.(last_checkpoint|.+\.pth)\.\w+\.tmp$')


@register_backend(ATOMIC_BACKEND, force=True)
class AtomicLocalBackend(LocalBackend):
    """MMEngine's local file backend whose ``put`` (the one write of a
    checkpoint, see ``mmengine.runner.save_checkpoint``) goes to a temporary
    file that is fsynced and renamed over the target."""

    def put(self, obj: bytes, filepath) -> None:
        atomic_write(filepath, lambda f: f.write(obj))


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` (same arguments) that never loses the last
    complete checkpoint: a checkpoint is written to a temporary file, fsynced
    and renamed; then ``last_checkpoint`` is replaced the same way; only then
    are the checkpoint that ``max_keep_ckpts`` drops and a replaced best
    checkpoint deleted. Temporary files of a killed run are removed when
    training starts again.

    Each checkpoint records the SHA-256 of its state dict's tensors, and a
    load checks it (torch does not check its zip's CRCs: flipped bytes in a
    weight would load as another model).

    Writes are atomic when checkpoints go to a local folder and neither
    ``backend_args`` nor ``file_client_args`` is given; with another backend
    its own ``put`` is used and only the ordering applies.
    """

    def before_train(self, runner) -> None:
        out_dir = self.out_dir if self.out_dir is not None else \
            runner.work_dir
        if self.backend_args is None and self.file_client_args is None and \
                type(get_file_backend(out_dir)) is LocalBackend:
            self.backend_args = dict(backend=ATOMIC_BACKEND)
        super().before_train(runner)
        self._check_best_settings(runner)
        if is_main_process():
            self._remove_temporaries(runner)

    def _check_best_settings(self, runner) -> None:
        """``save_best='accuracy/top1@w2a2'`` names a setting the validation
        runs (its bits, its SubNets), or training would fail at the first
        validation, after an epoch of work."""
        settings = getattr(runner.val_loop, 'settings', None) \
            if runner.val_loop is not None else None
        if not self.save_best or settings is None:
            return
        tags = [tag for tag, _ in settings]
        for key in self.key_indicators:
            suffix = key[key.index('@'):] if '@' in key else None
            if suffix is not None and suffix not in tags:
                raise ValueError(
                    f'default_hooks.checkpoint.save_best={key!r}: the '
                    f'validation runs {[t[1:] for t in tags]}, not '
                    f'{suffix[1:]!r} (change save_best with the bits)')

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Record the SHA-256 of the state dict's tensors in ``meta``."""
        checkpoint.setdefault('meta', {})[STATE_DIGEST] = tensor_digests(
            checkpoint['state_dict'].items())

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Refuse a checkpoint whose tensors do not match the SHA-256 it
        was written with (``load_from``, ``--resume``, ``tools/test.py``),
        before any of it is loaded into the model."""
        path = runner.cfg.get('load_from')
        refuse_integer_file(
            checkpoint, path, 'QAT starts from the FP32 checkpoint '
            '(load_from) or resumes from a training checkpoint (--resume)')
        check_state_digest(checkpoint, path)

    def _remove_temporaries(self, runner) -> None:
        folders = {runner.work_dir}
        if isinstance(self.file_backend, AtomicLocalBackend):
            folders.add(self.out_dir)
        for folder in folders:
            if not osp.isdir(folder):
                continue
            for name in os.listdir(folder):
                path = osp.join(folder, name)
                if _TEMPORARY.match(name) and osp.isfile(path):
                    os.remove(path)
                    runner.logger.warning(
                        f'removed {path}, a checkpoint file left half '
                        'written by an interrupted run')

    def _remove(self, path: str) -> None:
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
        elif self.file_backend.isdir(path):  # DeepSpeed saves folders
            self.file_backend.rmtree(path)

    def _save_checkpoint_with_step(self, runner, step, meta):
        """MMEngine's steps in a safe order: save, point ``last_checkpoint``
        at the new file, then delete the one ``max_keep_ckpts`` drops."""
        dropped = None
        if self.max_keep_ckpts > 0 and not (
                self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            # (a step saved twice, by the epoch and the best logic, counts
            # once)
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                dropped = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids',
                                           list(self.keep_ckpt_ids))
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir, filename, self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler, meta=meta,
            by_epoch=self.by_epoch, backend_args=self.backend_args,
            **self.args)
        if not is_main_process():
            return
        atomic_write(osp.join(runner.work_dir, 'last_checkpoint'),
                     lambda f: f.write(self.last_ckpt.encode()))
        if dropped is not None:
            path = self.file_backend.join_path(
                self.out_dir, self.filename_tmpl.format(dropped))
            if path != self.last_ckpt:
                self._remove(path)

    def _best_paths(self) -> dict:
        if len(self.key_indicators) == 1:
            return {None: self.best_ckpt_path}
        return dict(self.best_ckpt_path_dict)

    def _set_best_paths(self, paths: dict) -> None:
        if len(self.key_indicators) == 1:
            self.best_ckpt_path = paths[None]
        else:
            self.best_ckpt_path_dict.update(paths)

    def _save_best_checkpoint(self, runner, metrics) -> None:
        """MMEngine's, but a replaced best checkpoint is deleted after the
        new one (and the step's checkpoint that records it) is written.

        MMEngine deletes the previous best file it knows of before writing;
        hiding the paths from it and deleting afterwards keeps its logic."""
        if not self.save_best:
            return
        previous = self._best_paths()
        self._set_best_paths(dict.fromkeys(previous))
        try:
            super()._save_best_checkpoint(runner, metrics)
        finally:
            current = self._best_paths()
            self._set_best_paths({
                key: previous[key] if current[key] is None else current[key]
                for key in previous})
        if not is_main_process():
            return
        for key, path in previous.items():
            if path is not None and current[key] not in (None, path):
                self._remove(path)
                runner.logger.info(
                    f'The previous best checkpoint {path} is removed')


def check_state_digest(checkpoint: dict, name=None) -> None:
    """A ValueError naming the first tensor of the checkpoint's state dict
    that does not have the SHA-256 its ``meta`` records; a warning for an
    mmdrq QAT checkpoint written before the digests (not checked). Other
    checkpoints (an FP32 start) have none and pass."""
    source = f'checkpoint {name!r}' if name else 'the checkpoint'
    state = checkpoint.get('state_dict', {})
    digests = (checkpoint.get('meta') or {}).get(STATE_DIGEST)
    if not isinstance(digests, dict):
        if any('.weight_quantizer.' in key for key in state):
            print_log(f'{source} has no tensor digests (written by an older '
                      'mmdrq): its bytes are not checked',
                      logger='current', level=logging.WARNING)
        return
    changed = first_changed(digests, state)
    if changed is not None:
        raise ValueError(
            f'{source}: tensor {changed!r} does not match the SHA-256 '
            f'recorded when it was written ({STATE_DIGEST}): the file is '
            'damaged; refused before loading')


def read_checkpoint_header(path: str):
    """The checkpoint at ``path``, memory-mapped (no tensor data read), or
    an error naming it: missing, a folder, empty, not readable."""
    if osp.isdir(path):
        hint = ' (an ONNX export folder: test it with --backend ' \
            'onnxruntime)' if osp.isfile(osp.join(path, 'meta.json')) else ''
        raise IsADirectoryError(f'checkpoint {path!r} is a folder, not a '
                                f'checkpoint file{hint}')
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    if osp.getsize(path) == 0:
        raise ValueError(f'checkpoint {path!r} is empty')
    try:
        return load_weights_only(path, map_location='cpu', mmap=True)
    except (UnsafeCheckpointError, ValueError):  # these name the file
        raise
    except Exception as e:  # torch fails on damaged files in many ways
        raise ValueError(
            f'checkpoint {path!r} cannot be read, truncated or corrupt? '
            f'({type(e).__name__}: {e})') from e


def refuse_integer_file(state, path, what_to_do: str) -> None:
    """A ValueError naming ``path`` if ``state`` is an mmdrq integer file
    where a training checkpoint is needed; ``what_to_do`` instead."""
    if isinstance(state, dict) and 'int_weights' in state:
        raise ValueError(f'{path!r} is an mmdrq integer file (tools/'
                         f'export_int.py), not a training checkpoint: '
                         f'{what_to_do}')


def check_training_checkpoint(path: str, what_to_do: str):
    """The header of a local checkpoint file (None for a URL, which its
    loader checks), after refusing a folder, a missing, empty or damaged
    file, and an integer file (``what_to_do`` says what to give instead)."""
    if '://' in path:
        return None
    state = read_checkpoint_header(path)
    refuse_integer_file(state, path, what_to_do)
    return state


def check_testable(path: str) -> None:
    """Raise an error naming ``path`` unless it is a checkpoint of MMEngine
    (a ``state_dict``) that ``tools/test.py`` can load; URLs pass (their
    loader checks them)."""
    state = check_training_checkpoint(
        path, 'test the checkpoint it was exported from, or export it to '
        f'ONNX (tools/export_onnx.py CONFIG {osp.basename(path)} --out-dir '
        'DIR) and test DIR with --backend onnxruntime')
    if state is None:
        return
    if not isinstance(state, dict) or 'state_dict' not in state:
        raise ValueError(f'{path!r} is not a checkpoint of MMEngine\'s '
                         'runner: it has no state_dict')


def check_resumable(path: str) -> None:
    """Raise an error naming ``path`` unless it is a complete checkpoint of
    MMEngine's runner (``meta``, ``state_dict``, ``message_hub``). Cheap:
    the file is memory-mapped and no tensor data is read."""
    state = read_checkpoint_header(path)
    missing = [key for key in ('meta', 'state_dict', 'message_hub')
               if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f'{path!r} is not a training checkpoint of '
                         f"MMEngine's runner: it has no {missing}")


def _resumable(path: str) -> Optional[str]:
    """None if ``path`` can be resumed from, else why not."""
    try:
        check_resumable(path)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def resume_checkpoint(work_dir: str, requested: Optional[str] = None) -> str:
    """The checkpoint ``tools/train.py --resume [CKPT]`` continues from.

    ``requested`` must be resumable, or it is an error. Without it, the file
    ``work_dir/last_checkpoint`` names; if that is missing, empty or
    damaged, the newest (by modification time) complete checkpoint in
    ``work_dir`` with a warning (``best_*`` ones, which lack the optimizer
    state, excepted); if there is none, an error: never random weights.
    """
    if requested is not None:
        check_resumable(requested)
        return requested
    pointer = osp.join(work_dir, 'last_checkpoint')
    named = None
    if not osp.isfile(pointer):
        problem = f'{pointer} does not exist'
    else:
        with open(pointer) as f:
            named = f.read().strip() or None
        if named is None:
            problem = f'{pointer} is empty'
        else:
            why = _resumable(named)
            if why is None:
                return named
            problem = f'{pointer} names a checkpoint that cannot be ' \
                f'resumed: {why}'
    others = []
    if osp.isdir(work_dir):
        others = [osp.join(work_dir, name) for name in os.listdir(work_dir)
                  if name.endswith('.pth') and not name.startswith('best_')]
    others = [p for p in others if osp.isfile(p) and (
        named is None or osp.abspath(p) != osp.abspath(named))]
    for path in sorted(others, key=osp.getmtime, reverse=True):
        if _resumable(path) is None:
            print_log(f'--resume: {problem}; resuming from {path}, the '
                      'newest complete checkpoint in the work dir',
                      logger='current', level=logging.WARNING)
            return path
    raise FileNotFoundError(
        f'--resume: {problem}, and {work_dir} holds no complete checkpoint '
        'to resume from; run without --resume to start training')
