"""The float graph every bit's rewrite starts from: a copy of the model
with plain layers in place of the quantized ones (distinct placeholder
values, so that no export pass merges them), exported once; the BNs that
follow a conv folded out of it (the rewrite folds their values per bit);
debugging records of this machine removed."""
import copy
from typing import Dict, Optional

import onnx
import torch
from torch import nn

from mmdrq.quantization import quantized_layers
from mmdrq.quantization.layers import BitSwitchable
from .layer_forms import FlatLinear, placeholder, stand_in

# initializer names of a module's tensors start with it
PREFIX = 'model.'


def _replace(root: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition('.')
    setattr(root.get_submodule(parent) if parent else root, child, new)


def float_skeleton(model: nn.Module) -> nn.Module:
    """A float copy of ``model``'s structure: quantized layers plain, each
    switchable BN its first copy, every conv/linear with a bias (for the
    fold), every float Linear a Gemm on its named weight (what the
    rewrite and ``fp_layers`` find). Placeholder values are distinct so no pass merges them."""
    skeleton = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(0)
    for name, module in quantized_layers(skeleton).items():
        new = stand_in(module, generator)
        _placeholders(new, ('weight', ), generator)
        _replace(skeleton, name, new)
    for name, module in list(skeleton.named_modules()):
        if isinstance(module, BitSwitchable) and hasattr(module, 'bns'):
            norm = next(iter(module.bns.values()))
            if isinstance(norm, nn.GroupNorm):
                norm = _GroupNormAffine(norm)
            _placeholders(norm, ('weight', 'bias', 'running_mean',
                                 'running_var'), generator)
            _replace(skeleton, name, norm)
    for module in skeleton.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.bias = nn.Parameter(placeholder(module.weight.shape[0],
                                                   generator))
        if type(module) is nn.Linear:  # a Gemm on 3-d input too (FP head)
            module.__class__ = FlatLinear
    return skeleton


def _placeholders(module: nn.Module, names, generator: torch.Generator):
    """``placeholder`` values for the tensors ``names`` of ``module``: a
    fresh model's equal BN weights or zero-initialised offset convs would
    otherwise be merged (a BN after a deformable conv got another BN's
    statistics)."""
    for key in names:
        tensor = getattr(module, key, None)
        if isinstance(tensor, torch.Tensor):
            tensor.data = placeholder(tensor.shape, generator)


class _GroupNormAffine(nn.Module):
    """GroupNorm with its affine as a Mul and an Add on named parameters:
    exported as is, GN's affine becomes anonymous folded constants, which
    the per-bit rewrite could not find (switchable GN sets them per bit)."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        shape = (norm.num_channels, 1, 1)
        self.weight = nn.Parameter(norm.weight.detach().reshape(shape))
        self.bias = nn.Parameter(norm.bias.detach().reshape(shape))

    def forward(self, x):
        x = nn.functional.group_norm(x, self.num_groups, eps=self.eps)
        return x * self.weight + self.bias


def strip_debug_info(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove (in place, and return) what the exporter records for
    debugging: stack traces and module paths of this machine in every
    node's metadata and doc string."""
    def graphs(graph):
        yield graph
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField('g'):
                    yield from graphs(attribute.g)
                for sub in attribute.graphs:
                    yield from graphs(sub)

    for graph in graphs(proto.graph):
        graph.doc_string = ''
        for node in graph.node:
            node.doc_string = ''
            del node.metadata_props[:]
        for info in list(graph.value_info) + list(graph.input) + \
                list(graph.output):
            info.doc_string = ''
            del info.metadata_props[:]
    proto.doc_string = ''
    del proto.metadata_props[:]
    for function in proto.functions:
        for node in function.node:
            node.doc_string = ''
            del node.metadata_props[:]
    return proto


def _consumers(graph) -> Dict[str, list]:
    found = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    for output in graph.output:
        found.setdefault(output.name, []).append(None)
    return found


def module_of(init_name: str, suffix: str) -> Optional[str]:
    if init_name.startswith(PREFIX) and init_name.endswith(suffix):
        return init_name[len(PREFIX):-len(suffix)]
    return None


def fold_bn_nodes(proto: onnx.ModelProto, foldable) -> Dict[str, str]:
    """Remove every BatchNormalization whose input is the output of a Conv
    or ConvTranspose of a module in ``foldable`` (names, from
    ``forms.folds_bn``) used by nothing else; returns conv module -> BN
    module name."""
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    folded, keep = {}, []
    for node in graph.node:
        conv = producers.get(node.input[0]) if node.op_type == \
            'BatchNormalization' else None
        # a conv called more than once (shared weights) is not folded
        if conv is not None and \
                conv.op_type in ('Conv', 'ConvTranspose') and \
                module_of(conv.input[1], '.weight') in foldable and \
                len(consumers[conv.input[1]]) == 1 and \
                len(consumers[conv.output[0]]) == 1 and \
                all(not consumers.get(o) for o in node.output[1:]):
            conv_name = module_of(conv.input[1], '.weight')
            bn_name = module_of(node.input[1], '.weight')
            if conv_name and bn_name:
                folded[conv_name] = bn_name
                conv.output[0] = node.output[0]
                continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return folded
