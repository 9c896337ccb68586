"""Which quantized layer feeds which: found from one forward's autograd graph.

Forward hooks tag every quantized layer's output node; from each layer's
input node the graph is walked backwards until tagged nodes are reached.
Exactly one reached layer is that layer's producer; none (the input comes
from FP layers only) or several (residual sums, concatenations) leave it
unknown, and callers fall back to something that needs no producer.
"""
import contextlib
from collections import Counter, deque
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from .forms import folds_bn
from .layers import BitSwitchable, quantized_layers


def input_producers(model: nn.Module,
                    run_forward: Callable[[nn.Module], object]
                    ) -> Dict[str, Optional[str]]:
    """Layer name -> name of the unique quantized layer producing its input
    (None when there is no unique one). ``run_forward(model)`` runs one
    forward, in eval mode with gradients enabled; the model's state (BN
    statistics, lazily initialised quantizer scales) is restored after it,
    so a dummy input leaves no trace."""
    layers = quantized_layers(model)
    outputs, inputs, handles = {}, {}, []
    for name, layer in layers.items():
        def pre(module, args, name=name):
            if args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].grad_fn

        def post(module, args, out, name=name):
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                outputs[out.grad_fn] = name
        handles += [layer.register_forward_pre_hook(pre),
                    layer.register_forward_hook(post)]
    try:
        with probe_forward(model), torch.enable_grad():
            run_forward(model)
    finally:
        for handle in handles:
            handle.remove()
    return {name: _unique_producer(inputs.get(name), outputs)
            for name in layers}


@contextlib.contextmanager
def probe_forward(model: nn.Module):
    """Run a probing forward (a dummy input) without leaving a trace: eval
    mode inside, and the state (BN statistics, lazily initialised quantizer
    scales) and the training mode restored afterwards."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.load_state_dict(state)
        model.train(was_training)


def _unique_producer(start, outputs) -> Optional[str]:
    if start is None:
        return None
    found, seen, queue = set(), {start}, deque([start])
    while queue:
        node = queue.popleft()
        if node in outputs:
            found.add(outputs[node])
            continue
        for parent, _ in node.next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return found.pop() if len(found) == 1 else None


def conv_bn_pairs(model: nn.Module,
                  run_forward: Callable[[nn.Module], object]
                  ) -> Dict[str, str]:
    """Conv name -> name of the BN (plain, switchable or transitional)
    that is the only consumer of its output, both called once: the pairs
    the ONNX exporter folds (the convs of ``forms.folds_bn``). ``run_forward(model)`` runs one forward and
    returns its outputs (tensors, possibly nested); as for
    ``input_producers``, the model's state is restored after it."""
    norms = _batch_norms(model)
    convs = {name: m for name, m in model.named_modules() if folds_bn(m)}
    conv_outputs, norm_inputs, calls, handles = {}, {}, Counter(), []
    for name, conv in convs.items():
        def post(module, args, out, name=name):
            calls[name] += 1
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                conv_outputs[out.grad_fn] = name
        handles.append(conv.register_forward_hook(post))
    for name, norm in norms.items():
        def pre(module, args, name=name):
            calls[name] += 1
            if args and isinstance(args[0], torch.Tensor):
                norm_inputs[name] = args[0].grad_fn
        handles.append(norm.register_forward_pre_hook(pre))
    try:
        with probe_forward(model), torch.enable_grad():
            outputs = run_forward(model)
    finally:
        for handle in handles:
            handle.remove()
    uses = _uses(outputs)
    pairs = {}
    for norm, node in norm_inputs.items():
        conv = conv_outputs.get(node)
        if conv is not None and uses[node] == 1 and \
                calls[conv] == calls[norm] == 1:
            pairs[conv] = norm
    return pairs


def _batch_norms(model: nn.Module) -> Dict[str, nn.Module]:
    """BNs by the name a forward calls: a switchable or transitional BN of
    BN copies, else a plain BN."""
    found = {}
    for name, module in model.named_modules():
        if any(name.startswith(outer + '.') for outer in found):
            continue  # a copy inside a switchable BN
        copies = getattr(module, 'bns', None)
        if isinstance(module, _BatchNorm) or (
                isinstance(module, BitSwitchable) and copies is not None and
                all(isinstance(c, _BatchNorm) for c in copies.values())):
            found[name] = module
    return found


def _uses(outputs) -> Counter:
    """How often each autograd node's output is used: by other nodes and
    as a returned tensor."""
    roots = [t.grad_fn for t in pytree.tree_flatten(outputs)[0]
             if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    uses, seen, queue = Counter(roots), set(roots), deque(roots)
    while queue:
        for parent, _ in queue.popleft().next_functions:
            if parent is None:
                continue
            uses[parent] += 1
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return uses
