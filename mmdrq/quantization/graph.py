"""Which quantized layer feeds which: found from one forward's autograd graph.

Forward hooks tag every quantized layer's output node; from each layer's
input node the graph is walked backwards until tagged nodes are reached.
Exactly one reached layer is that layer's producer; none (the input comes
from FP layers only) or several (residual sums, concatenations) leave it
unknown, and callers fall back to something that needs no producer.
"""
import contextlib
from collections import deque
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .layers import quantized_layers


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
