"""Test loop that runs an export folder's ONNX files in ONNX Runtime.

The model of the config is kept for what surrounds the network: its data
preprocessor before, and its own post-processing after (the classifier
head's predictions, a detector head's ``predict_by_feat``, a segmentor's
resize and argmax), the split mmdeploy makes.
"""
import contextlib
from typing import Optional, Sequence, Union

import numpy as np
import torch
from mmengine.runner import TestLoop
from torch.utils import _pytree as pytree

from mmdrq.engine.loops import run_settings
from mmdrq.models import architecture_of
from mmdrq.models.tasks import decode_head, dense_head, task_of
from mmdrq.quantization.bitwidths import bit_tag, tag
from mmdrq.registry import LOOPS
from .pipeline_graph import pipeline_feeds
from mmdrq_runtime.inferencer import detections
from mmdrq_runtime.session import SwitchableSession


def pipeline_predictions(session: SwitchableSession, inputs: torch.Tensor,
                         data_samples):
    """Data samples with the predictions of a whole-pipeline graph
    (``mmdrq.deploy.pipeline_graph``): scores and labels of a classifier;
    a detector's boxes, scores and labels, image by image with its resized
    size and scale; labels per pixel of a segmentor, image by image with
    its padding and original size."""
    task = session.meta['pipeline']['task']
    images = inputs.detach().float().cpu().numpy()
    if task == 'classification':
        scores, labels = run_session(session, inputs)
        for sample, score, label in zip(data_samples, scores, labels):
            sample.set_pred_score(score).set_pred_label(label.view(1))
        return data_samples
    if task == 'detection':
        from mmengine.structures import InstanceData
        for image, sample in zip(images, data_samples):
            meta = sample.metainfo
            found = detections(session, image[None], meta['img_shape'],
                               meta['scale_factor'], meta['ori_shape'])
            found['bboxes'] = found.pop('boxes')
            sample.pred_instances = InstanceData(
                **{k: torch.from_numpy(v) for k, v in found.items()})
        return data_samples
    from mmengine.structures import PixelData
    for image, sample in zip(images, data_samples):
        meta = sample.metainfo
        if meta.get('flip'):
            raise ValueError('the segmentation graph does not undo test-time '
                             'flips: drop the flip from the test pipeline')
        left, right, top, bottom = meta.get('img_padding_size',
                                            meta.get('padding_size',
                                                     [0] * 4))
        labels = session.run(image[None], crop=np.array(
            [top, bottom, left, right], np.int64), output_size=np.array(
                meta['ori_shape'][:2], np.int64))[0]
        sample.set_data(dict(pred_sem_seg=PixelData(
            data=torch.from_numpy(labels))))
    return data_samples


def postprocess(model, outputs, data_samples):
    """Data samples with predictions from the network's tensor outputs
    (the structure ``model(inputs, mode='tensor')`` returns)."""
    metas = [sample.metainfo for sample in data_samples]
    if dense_head(model) is not None:
        results = dense_head(model).predict_by_feat(
            *outputs, batch_img_metas=metas, rescale=True)
        return model.add_pred_to_datasample(data_samples, results)
    if decode_head(model) is not None:
        logits = decode_head(model).predict_by_feat(outputs, metas)
        return model.postprocess_result(logits, data_samples)
    if task_of(model) == 'classification':
        return model.head._get_predictions(outputs, data_samples)
    raise TypeError(f'no ONNX post-processing for {type(model).__name__}: '
                    'classifiers (mmpretrain heads), single-stage detectors '
                    'and mmseg segmentors are supported')


def check_input_shape(meta: dict, shape) -> bool:
    """Whether ``shape`` must run image by image (the export fixed its
    batch); an error naming the sizes when the export fixed another height
    or width."""
    dims = meta['input_dims']
    for axis, (want, got) in enumerate(zip(dims, shape)):
        if axis > 0 and want is not None and want != got:
            raise ValueError(
                f'the export takes inputs of shape {dims} (None: any), the '
                f'test pipeline gives {list(shape)}: export again with '
                f'--input-shape {" ".join(map(str, [1] + list(shape[1:])))}'
                ' (the default takes the test pipeline\'s)')
    return dims[0] is not None and dims[0] != shape[0]


def run_session(session: SwitchableSession, inputs: torch.Tensor):
    """The session's outputs in the structure of the PyTorch outputs."""
    inputs = inputs.detach().float().cpu().numpy()
    if check_input_shape(session.meta, inputs.shape):
        rows = [session.run(inputs[i:i + 1]) for i in range(len(inputs))]
        arrays = [np.concatenate(parts) for parts in zip(*rows)]
    else:
        arrays = session.run(inputs)
    if session.meta.get('pipeline'):
        return [torch.from_numpy(a) for a in arrays]
    spec = pytree.treespec_loads(session.meta['output_tree'])
    return pytree.tree_unflatten([torch.from_numpy(a) for a in arrays], spec)


def settings_to_run(available: list, bits, subnets, export_dir: str) -> list:
    """(tag, setting) pairs of an export folder to test: ``bits`` is
    ``'all'`` (with every exported SubNet unless ``subnets`` names some), a
    bit or a list of bits; each must be exported."""
    exported_bits = [k for k in available if isinstance(k, int)]
    if bits == 'all':
        bits = exported_bits
        subnets = [k for k in available if isinstance(k, str)] \
            if subnets is None else subnets
    elif isinstance(bits, int) and not isinstance(bits, bool):
        bits = [bits]
    elif isinstance(bits, str) or not isinstance(bits, (list, tuple)):
        raise ValueError(f"test_cfg.bits must be 'all', a bit or a list of "
                         f'bits, got {bits!r}')
    for key in list(bits) + list(subnets or []):
        if key not in available:
            raise ValueError(f'{key!r} is not exported in {export_dir!r} '
                             f'(available: {available})')
    return [(bit_tag(b), b) for b in bits] + \
        [(tag(name), name) for name in subnets or []]


@LOOPS.register_module()
class OnnxRuntimeTestLoop(TestLoop):
    """Every export of ``export_dir`` (or ``bits`` and ``subnets`` of it)
    through ONNX Runtime, with a metric table keyed as
    ``MultiBitTestLoop``'s (``accuracy/top1@w4a4``, ``...@<subnet>``).

    Args:
        export_dir: folder written by tools/export_onnx.py.
        bits: ``'all'`` or bits to run; subnets: SubNet names to run (all
            exported ones by default when ``bits`` is ``'all'``).
        threads: ONNX Runtime intra-op threads (default: its own choice).
        kernels: ``exact``, ``integer`` or ``nbits`` (see
            ``make_session``).
        measure_speed: add ``images_per_s`` per setting.
    """

    def __init__(self, runner, dataloader, evaluator, export_dir: str,
                 bits: Union[str, Sequence[int]] = 'all',
                 subnets: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, kernels: str = 'exact',
                 measure_speed: bool = False, fp16: bool = False):
        super().__init__(runner, dataloader, evaluator, fp16)
        self.session = SwitchableSession(export_dir, threads, kernels)
        self.settings = settings_to_run(self.session.available, bits,
                                        subnets, export_dir)
        self.measure_speed = measure_speed

    @property
    def _model(self):
        return architecture_of(self.runner.model)

    def run(self) -> dict:
        self.runner.call_hook('before_test')
        self.runner.call_hook('before_test_epoch')
        self.runner.model.eval()
        metrics = run_settings(
            self, lambda setting: contextlib.nullcontext(
                self.session.set_bits(setting)),
            'test metrics per bit-width (ONNX Runtime)')
        self.runner.call_hook('after_test_epoch', metrics=metrics)
        self.runner.call_hook('after_test')
        return metrics

    @torch.no_grad()
    def run_iter(self, idx, data_batch):
        self.runner.call_hook('before_test_iter', batch_idx=idx,
                              data_batch=data_batch)
        model = self._model
        data = model.data_preprocessor(data_batch, False)
        if getattr(model, 'export_inputs', None) == 'token_ids':
            # a language model: next-token losses of whole sequences (an
            # empty cache), on the CPU beside the session's logits
            inputs = data['inputs'].cpu()
            tokens = inputs[:, :-1].numpy()
            logits = self.session.run(tokens, **pipeline_feeds(
                self.session.meta['pipeline'], tokens.shape))[0]
            samples = model.predictions(torch.from_numpy(logits), inputs)
        elif self.session.meta.get('pipeline'):
            samples = pipeline_predictions(self.session, data['inputs'],
                                           data['data_samples'])
        else:
            outputs = run_session(self.session, data['inputs'])
            samples = postprocess(model, outputs, data['data_samples'])
        self.evaluator.process(data_samples=samples, data_batch=data_batch)
        self.runner.call_hook('after_test_iter', batch_idx=idx,
                              data_batch=data_batch, outputs=samples)


def onnxruntime_test_cfg(cfg, export_dir: str, bits=None, subnets=None,
                         kernels: str = 'exact'):
    """Make ``cfg`` test ``export_dir``'s ONNX files (no weights loaded:
    the model only pre- and post-processes)."""
    cfg.load_from = None
    cfg.test_cfg = dict(type='mmdrq.OnnxRuntimeTestLoop',
                        export_dir=export_dir, bits=bits or 'all',
                        subnets=subnets, kernels=kernels)
