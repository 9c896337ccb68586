"""Per-layer Hessian traces by Hutchinson's estimator (method.md §4).

tr(H_l) = E[v_l . (H v)_l] for Rademacher probes v; H v comes from a double
backward. Through the quantizers' straight-through estimator the traces are
those of the STE-linearised network at the bit it runs at.
"""
import json
import os
import tempfile
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from mmdrq.quantization.bit_control import model_bits, use_bits
from mmdrq.quantization.layers import _QuantLayer

FORMAT = 'mmdrq-traces'


def hutchinson_traces(loss_fn: Callable, params: Dict[str, torch.Tensor],
                      batches: Iterable, max_probes: int = 50,
                      min_probes: int = 4, tol: float = 1e-3,
                      generator: Optional[torch.Generator] = None,
                      progress: Optional[Callable] = None) -> Dict[str, dict]:
    """Trace of the loss Hessian w.r.t. each tensor of ``params``.

    Per batch, probes are added until the running mean of the total trace
    moves by less than ``tol`` (relative) twice in a row (after
    ``min_probes``), or ``max_probes`` is reached; batches are averaged.
    Returns ``{name: dict(trace, numel, trace_per_param, probes)}``.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    sums = torch.zeros(len(names), dtype=torch.float64)
    probes = 0
    for step, batch in enumerate(batches):
        loss = loss_fn(batch)
        grads = torch.autograd.grad(loss, tensors, create_graph=True)
        batch_sum = torch.zeros(len(names), dtype=torch.float64)
        mean, calm = None, 0
        for k in range(max_probes):
            vs = [torch.randint(0, 2, t.shape, generator=generator).to(t) * 2
                  - 1 for t in tensors]
            hvs = torch.autograd.grad(grads, tensors, grad_outputs=vs,
                                      retain_graph=True)
            batch_sum += torch.stack([(v * hv).sum().double().cpu()
                                      for v, hv in zip(vs, hvs)])
            new_mean = float(batch_sum.sum()) / (k + 1)
            if mean is not None and abs(new_mean - mean) <= tol * max(
                    abs(new_mean), 1e-12):
                calm += 1
            else:
                calm = 0
            mean = new_mean
            if k + 1 >= min_probes and calm >= 2:
                break
        sums += batch_sum / (k + 1)
        probes += k + 1
        if progress is not None:
            progress(step)
    count = max(step + 1, 1)
    return {n: dict(trace=float(sums[i] / count), numel=tensors[i].numel(),
                    trace_per_param=float(sums[i] / count) /
                    tensors[i].numel(), probes=probes)
            for i, n in enumerate(names)}


def quantized_weights(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Quantized layers' weights, named as in the converted architecture."""
    arch = getattr(model, 'architecture', model)
    return {n: m.weight for n, m in arch.named_modules()
            if isinstance(m, _QuantLayer)}


def model_traces(model: nn.Module, data_loader: Iterable,
                 num_samples: int = 1000, **kwargs) -> Dict[str, dict]:
    """Traces of every quantized layer's weight through an OpenMMLab
    model's own loss (classification, detection, segmentation alike), at
    the highest bit, in eval mode (BN uses its running statistics), over
    about ``num_samples`` images of ``data_loader``."""
    arch = getattr(model, 'architecture', model)
    params = quantized_weights(model)
    frozen = [p for p in params.values() if not p.requires_grad]

    def batches():
        seen = 0
        for batch in data_loader:
            if seen >= num_samples:
                return
            seen += len(batch['inputs'])
            yield batch

    def loss_fn(batch):
        data = model.data_preprocessor(batch, True)
        loss, _ = model.parse_losses(model._run_forward(data, mode='loss'))
        return loss

    was_training = model.training
    model.eval()
    try:
        for p in frozen:  # frozen stages still get a sensitivity
            p.requires_grad_(True)
        with use_bits(arch, model_bits(arch)[0]), torch.enable_grad():
            return hutchinson_traces(loss_fn, params, batches(), **kwargs)
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)


def save_traces(path: str, traces: Dict[str, dict], meta: dict):
    """JSON, written to a temporary file and renamed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(dict(format=FORMAT, meta=meta, layers=traces), f,
                      indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_traces(path: str, model: nn.Module) -> Dict[str, dict]:
    """Read a traces file, refusing one made for another model."""
    with open(path) as f:
        content = json.load(f)
    if content.get('format') != FORMAT:
        raise ValueError(f'{path!r} is not an mmdrq traces file')
    layers = content['layers']
    names = set(quantized_weights(model))
    if set(layers) != names:
        raise ValueError(
            f'traces file {path!r} is for another model: layers missing '
            f'from it {sorted(names - set(layers))[:5]}, layers the model '
            f'lacks {sorted(set(layers) - names)[:5]}')
    return layers
