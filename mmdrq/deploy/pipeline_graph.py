"""The task's post-processing appended to the exported graph, so that a
deploy host gets predictions, not head tensors (``--graph pipeline``).

- classification (a softmax head): ``scores`` (softmax) and ``labels``
  (argmax), as mmpretrain's ``ClsHead`` predicts;
- segmentation (a per-pixel decode head): mmseg's resize of the logits to
  the input size, the crop of the test-time padding (``crop``: top, bottom,
  left, right), the resize to ``output_size`` (the original image's height
  and width) and the argmax: ``labels`` per pixel, as mmseg's
  ``postprocess_result`` makes them (bilinear, ONNX Resize with the decode
  head's ``align_corners``).

- detection: ``mmdrq.deploy.detection_graph`` (traced with the model).
"""
from typing import Optional

import onnx
from onnx import TensorProto, helper, numpy_helper

import numpy as np

from mmdrq.models.tasks import task_of, two_stage
from mmdrq.utils.checks import check_choice
from mmdrq_runtime.generation import empty_cache

GRAPHS = ('auto', 'pipeline', 'tensor')


def pipeline_task(model, graph: str) -> Optional[str]:
    """The task whose post-processing goes into the graph (None: the head
    tensors are the outputs); ``graph='pipeline'`` refuses a model that
    has none."""
    check_choice('graph', graph, GRAPHS)
    task = task_of(model)
    if task == 'segmentation' and \
            model.decode_head.conv_seg.out_channels == 1:
        task = None  # a thresholded binary head: not an argmax
    reason = None
    if task == 'detection':
        from .detection_graph import detection_refusal
        reason = detection_refusal(model)
        task = None if reason else task
    if two_stage(model) and graph == 'tensor':
        raise ValueError(f'{type(model).__name__}: a two-stage detector '
                         'exports only as the whole pipeline (its RoI head '
                         "runs on the RPN's proposals): graph='auto' or "
                         "'pipeline' (--graph)")
    if graph == 'pipeline' and task is None:
        reason = reason or ('not a classifier, single-stage detector or '
                            'segmentor')
        raise ValueError(f'{type(model).__name__}: no whole-pipeline graph: '
                         f"{reason}; export with graph='tensor' (--graph "
                         'tensor)')
    return None if graph == 'tensor' else task


def append_pipeline(proto: onnx.ModelProto, task: str, model) -> dict:
    """Append ``task``'s post-processing to ``proto`` (in place): its
    outputs become the predictions. Returns what the graph's inputs and
    outputs now are (for meta.json)."""
    graph = proto.graph
    logits = graph.output[0].name
    del graph.output[:]
    if task == 'classification':
        graph.node.extend([
            helper.make_node('Softmax', [logits], ['scores'], axis=1,
                             name='pipeline.softmax'),
            helper.make_node('ArgMax', ['scores'], ['labels'], axis=1,
                             keepdims=0, name='pipeline.argmax')])
        graph.output.extend([
            helper.make_tensor_value_info('scores', TensorProto.FLOAT,
                                          ['batch', 'classes']),
            helper.make_tensor_value_info('labels', TensorProto.INT64,
                                          ['batch'])])
        return dict(task=task, extra_inputs=[], outputs=['scores', 'labels'])
    align = bool(model.decode_head.align_corners)
    mode = 'align_corners' if align else 'pytorch_half_pixel'
    graph.input.extend([
        helper.make_tensor_value_info('crop', TensorProto.INT64, [4]),
        helper.make_tensor_value_info('output_size', TensorProto.INT64, [2])])
    graph.initializer.extend([
        numpy_helper.from_array(np.array(v, np.int64), f'pipeline.{k}')
        for k, v in (('zero', [0]), ('two', [2]), ('four', [4]),
                     ('top_left', [0, 2]), ('bottom_right', [1, 3]),
                     ('spatial', [2, 3]))])

    def resize(source, sizes, out):
        return helper.make_node(
            'Resize', [source, '', '', sizes], [out], mode='linear',
            coordinate_transformation_mode=mode, name=f'pipeline.{out}')

    graph.node.extend([
        helper.make_node('Shape', [graph.input[0].name], ['pipeline.shape']),
        helper.make_node('Slice', ['pipeline.shape', 'pipeline.two',
                                   'pipeline.four'], ['pipeline.hw']),
        helper.make_node('Shape', [logits], ['pipeline.logits_shape']),
        helper.make_node('Slice', ['pipeline.logits_shape', 'pipeline.zero',
                                   'pipeline.two'], ['pipeline.nc']),
        helper.make_node('Concat', ['pipeline.nc', 'pipeline.hw'],
                         ['pipeline.input_sizes'], axis=0),
        resize(logits, 'pipeline.input_sizes', 'pipeline.at_input'),
        helper.make_node('Gather', ['crop', 'pipeline.top_left'],
                         ['pipeline.starts'], axis=0),
        helper.make_node('Gather', ['crop', 'pipeline.bottom_right'],
                         ['pipeline.padding_end'], axis=0),
        helper.make_node('Sub', ['pipeline.hw', 'pipeline.padding_end'],
                         ['pipeline.ends']),
        helper.make_node('Slice', ['pipeline.at_input', 'pipeline.starts',
                                   'pipeline.ends', 'pipeline.spatial'],
                         ['pipeline.cropped']),
        helper.make_node('Concat', ['pipeline.nc', 'output_size'],
                         ['pipeline.output_sizes'], axis=0),
        resize('pipeline.cropped', 'pipeline.output_sizes',
               'pipeline.at_output'),
        helper.make_node('ArgMax', ['pipeline.at_output'], ['labels'],
                         axis=1, keepdims=0, name='pipeline.argmax')])
    graph.output.append(helper.make_tensor_value_info(
        'labels', TensorProto.INT64, ['batch', 'height', 'width']))
    return dict(task=task, extra_inputs=['crop', 'output_size'],
                outputs=['labels'], align_corners=align)


def torch_pipeline(task: str, outputs, inputs, model):
    """PyTorch's predictions the appended graph computes (no padding, the
    input's size as the output size): the probe's reference."""
    import torch
    import torch.nn.functional as F
    logits = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    if task == 'detection':  # the detector's own predict
        from mmdet.structures import DetDataSample
        size = tuple(inputs.shape[2:])
        samples = [DetDataSample(metainfo=dict(
            img_shape=size, ori_shape=size, scale_factor=(1.0, 1.0)))
            for _ in range(len(inputs))]
        found = model.predict(inputs, samples)
        return [sample.pred_instances.scores for sample in found]
    if task == 'classification':
        scores = F.softmax(logits, dim=1)
        return [scores, scores.argmax(dim=1)]
    resized = F.interpolate(logits, size=inputs.shape[2:], mode='bilinear',
                            align_corners=bool(model.decode_head.align_corners))
    return [torch.argmax(resized, dim=1)]


def pipeline_feeds(pipeline: Optional[dict], shape) -> dict:
    """The extra inputs of a pipeline graph for an input of ``shape`` with
    no padding and the input's own size as the output size."""
    if not pipeline or not pipeline['extra_inputs']:
        return {}
    if pipeline['task'] == 'language_model':  # the whole sequence: no past
        return empty_cache(pipeline['cache_shape'], shape[0])
    if pipeline['task'] == 'detection':
        return dict(image_size=np.array(shape[2:], np.float32),
                    inverse_scale=np.ones(2, np.float32))
    return dict(crop=np.zeros(4, np.int64),
                output_size=np.array(shape[2:], np.int64))
