"""Per-layer Hessian traces by Hutchinson's estimator (docs/method.md,
Hessian traces).

tr(H_l) = E[v_l . (H v)_l] for Rademacher probes v; ``H v`` comes from a
double backward. mmdrq's fake quantization (``_FakeQuant``) is twice
differentiable as it stands: its backward is ``where(inside, grad_out, 0)``,
recorded under ``create_graph``, linear in ``grad_out`` with a piecewise
constant mask. The traces are therefore exact traces of the STE-linearised
network at the bit it runs at; weights clipped by their quantizer get zero
rows and columns (they add nothing).
"""
import json
import math
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from mmdrq.models import architecture_of
from mmdrq.quantization.bit_control import model_bits, use_bits
from mmdrq.quantization.layers import quantized_layers
from mmdrq.utils import atomic_write_json

FORMAT = 'mmdrq-traces'


def _check_options(max_probes, min_probes, tol):
    if not 1 <= int(min_probes) <= int(max_probes):
        raise ValueError(f'min_probes must lie in [1, max_probes='
                         f'{max_probes}], got {min_probes!r}')
    if not tol >= 0:
        raise ValueError(f'tol must be >= 0, got {tol!r}')


def _probe_products(pairs, tensors, generator, per_tensor):
    """``v_i . (H v)_i`` of one Rademacher probe, for each (index, grad)."""
    vs = [torch.randint(0, 2, tensors[i].shape, generator=generator).to(
        tensors[i]) * 2 - 1 for i, _ in pairs]
    if per_tensor:  # v is zero outside tensor i: H_ii v_i alone
        hvs = [torch.autograd.grad(g, tensors[i], v, retain_graph=True,
                                   allow_unused=True)[0]
               for (i, g), v in zip(pairs, vs)]
    else:  # one product for all: the blocks H_ij v_j add to (H v)_i
        every = torch.autograd.grad([g for _, g in pairs], tensors, vs,
                                    retain_graph=True, allow_unused=True)
        hvs = [every[i] for i, _ in pairs]
    zero = torch.zeros((), dtype=torch.float64, device=vs[0].device)
    return torch.stack([zero if hv is None else
                        (v * hv).sum(dtype=torch.float64)
                        for v, hv in zip(vs, hvs)]).cpu()


def _batch_traces(loss, tensors, max_probes, min_probes, tol, generator,
                  per_tensor):
    """Per-tensor traces of one batch's loss (float64) and the probe count:
    probes stop once the running mean of the total moved by less than
    ``tol`` (relative) twice in a row, after ``min_probes``."""
    grads = torch.autograd.grad(loss, tensors, create_graph=True,
                                allow_unused=True)
    # a tensor unused by the loss, or one the loss is linear in, has H = 0
    pairs = [(i, g) for i, g in enumerate(grads)
             if g is not None and g.requires_grad]
    sums = torch.zeros(len(tensors), dtype=torch.float64)
    if not pairs:
        return sums, 0
    mean, calm = None, 0
    for k in range(1, max_probes + 1):
        sums[[i for i, _ in pairs]] += _probe_products(
            pairs, tensors, generator, per_tensor)
        new_mean = float(sums.sum()) / k
        change = math.inf if mean is None else abs(new_mean - mean)
        calm = calm + 1 if change <= tol * abs(new_mean) else 0
        mean = new_mean
        if k >= min_probes and calm >= 2:
            break
    return sums / k, k


def hutchinson_traces(loss_fn: Callable, params: Dict[str, torch.Tensor],
                      batches: Iterable, max_probes: int = 10,
                      min_probes: int = 2, tol: float = 1e-3,
                      generator: Optional[torch.Generator] = None,
                      progress: Optional[Callable] = None,
                      per_tensor: bool = True) -> Dict[str, dict]:
    """Trace of the Hessian of ``loss_fn(batch)`` w.r.t. each tensor.

    One forward and backward per batch; its graph serves every probe (a
    probe is one Hessian-vector product), so ``batches`` is iterated once
    and may be a generator. Probes per batch stop at ``max_probes`` or when
    the running mean of the total trace changes by less than ``tol``
    (relative) for two probes in a row after ``min_probes``; the batch
    estimates are averaged, so a few probes per batch suffice.

    ``per_tensor=True`` takes one Hessian-vector product per tensor and
    probe, the probe zero outside the tensor: each estimate then sees only
    its own block H_ii (non-negative when H_ii is PSD). ``False`` takes one
    product for all tensors: as many times cheaper, but the cross blocks
    H_ij (large in deep nets) add their variance to every tensor's
    estimate. ``progress(step, total)`` is called after each batch
    (``total`` is None for unsized iterables).

    Returns:
        ``{name: dict(trace, numel, trace_per_param, probes)}``; ``probes``
        counts the Hessian-vector products of all batches.
    """
    _check_options(max_probes, min_probes, tol)
    if not params:
        raise ValueError('params is empty: no tensor to take traces of')
    for name, tensor in params.items():
        if not tensor.requires_grad:
            raise ValueError(f'params[{name!r}] does not require grad')
    names, tensors = list(params), list(params.values())
    try:
        total = len(batches)
    except TypeError:  # a generator, or a loader of unknown batch size
        total = None
    sums = torch.zeros(len(names), dtype=torch.float64)
    steps = probes = 0
    for batch in batches:
        traces, used = _batch_traces(loss_fn(batch), tensors, int(max_probes),
                                     int(min_probes), tol, generator,
                                     per_tensor)
        sums += traces
        steps, probes = steps + 1, probes + used
        if progress is not None:
            progress(steps, total)
    if steps == 0:
        raise ValueError('batches is empty: no loss to take traces of')
    result = {}
    for name, tensor, value in zip(names, tensors, (sums / steps).tolist()):
        result[name] = dict(trace=value, numel=tensor.numel(),
                            trace_per_param=value / tensor.numel(),
                            probes=probes)
    return result


def quantized_weights(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The weights of ``model``'s quantized layers by module name, relative
    to the converted architecture (no ``architecture.`` for the wrapper),
    as ``mmdrq.get_bits`` and SubNet files name them."""
    layers = quantized_layers(architecture_of(model), required=True)
    return {name: module.float_weight for name, module in layers.items()}


class _FirstSamples:
    """Batches of ``loader`` until ``num_samples`` images (whole batches)."""

    def __init__(self, loader: Iterable, num_samples: int):
        self.loader, self.num_samples = loader, num_samples

    def __len__(self):
        size = getattr(self.loader, 'batch_size', None)
        if not size:
            raise TypeError('unknown batch size')
        return min(len(self.loader), -(-self.num_samples // size))

    def __iter__(self):
        seen = 0
        for batch in self.loader:
            yield batch
            seen += len(batch['inputs'])
            if seen >= self.num_samples:
                return


def model_traces(model: nn.Module, data_loader: Iterable,
                 num_samples: int = 1000, **kwargs) -> Dict[str, dict]:
    """Traces of every quantized layer's weight through an OpenMMLab
    model's own loss (any BaseModel, or mmdrq's MultiPrecisionQAT), over the
    first batches of ``data_loader`` covering ``num_samples`` images.

    Runs at the highest bit in eval mode: BN uses its running statistics,
    so the loss is a fixed function of the weights (batch statistics would
    couple the samples and change with every batch). Only the traced
    weights require grad meanwhile (no second-order graph for scales or
    BN). Mode, bits and ``requires_grad`` flags are restored afterwards.
    ``kwargs`` go to ``hutchinson_traces``.
    """
    if int(num_samples) < 1:
        raise ValueError(f'num_samples must be >= 1, got {num_samples!r}')
    params, arch = quantized_weights(model), architecture_of(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def loss_fn(batch):
        data = model.data_preprocessor(batch, True)
        losses = model._run_forward(data, mode='loss')
        return model.parse_losses(losses)[0]

    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params.values():  # frozen stages still get a trace
            p.requires_grad_(True)
        model.eval()
        with use_bits(arch, model_bits(arch)[0]), torch.enable_grad():
            return hutchinson_traces(
                loss_fn, params, _FirstSamples(data_loader, num_samples),
                **kwargs)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def save_traces(path: str, traces: Dict[str, dict], meta: dict,
                model: Optional[nn.Module] = None):
    """Write the traces as JSON, atomically (temporary file, then rename).
    ``model`` only records the architecture's type name."""
    bad = sorted(n for n, t in traces.items()
                 if not math.isfinite(t['trace_per_param']))
    if bad:
        raise ValueError(f'non-finite traces of layers {bad[:5]}: the loss '
                         'is NaN/inf on these batches; nothing written')
    name = None if model is None else type(architecture_of(model)).__name__
    content = dict(format=FORMAT, model=name, layers=traces, meta=meta)
    atomic_write_json(path, content)


def load_traces(path: str, model: nn.Module) -> Dict[str, dict]:
    """The ``layers`` of a traces file, after checking they are exactly the
    quantized layers of ``model`` (wrapper or converted architecture)."""
    with open(path) as f:
        content = json.load(f)
    if not isinstance(content, dict) or content.get('format') != FORMAT:
        found = content.get('format') if isinstance(content, dict) else None
        raise ValueError(f'{path!r} is not an mmdrq traces file: format '
                         f'{found!r}, expected {FORMAT!r}')
    layers = content.get('layers') or {}
    names = set(quantized_weights(model))
    missing, extra = sorted(names - set(layers)), sorted(set(layers) - names)
    if missing or extra:
        raise ValueError(
            f'traces file {path!r} for another model (made for '
            f'{content.get("model")!r}): layers missing from it '
            f'{missing[:8]}, layers the model lacks {extra[:8]}')
    for name, entry in layers.items():
        value = dict(entry).get('trace_per_param')
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f'{path!r}: layer {name!r} has trace_per_param '
                             f'{value!r}, expected a finite number')
    return layers
