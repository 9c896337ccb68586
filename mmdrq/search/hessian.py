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
import contextlib
import math
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from mmdrq.models import architecture_of
from mmdrq.quantization.bit_control import model_bits, use_bits
from mmdrq.quantization.layers import quantized_layers
from mmdrq.quantization.learned_scale import LearnedScaleQuantizer
from mmdrq.utils import atomic_write_json
from mmdrq.utils.checks import check_choice
from mmdrq.utils.json_files import read_json
from .calibration import FirstSamples, model_loss, without_batch_augments

FORMAT = 'mmdrq-traces'


HVP_METHODS = ('auto', 'autograd', 'finite_difference')

# the code object shared by every ``@once_differentiable`` backward
_ONCE_DIFFERENTIABLE = torch.autograd.function.once_differentiable(
    lambda ctx: None).__code__


def _check_options(max_probes, min_probes, tol, hvp):
    if not 1 <= int(min_probes) <= int(max_probes):
        raise ValueError(f'min_probes must lie in [1, max_probes='
                         f'{max_probes}], got {min_probes!r}')
    if not tol >= 0:
        raise ValueError(f'tol must be >= 0, got {tol!r}')
    check_choice('hvp', hvp, HVP_METHODS)


def once_differentiable_ops(loss: torch.Tensor) -> List[str]:
    """Names of the autograd Functions in ``loss``'s graph whose backward
    is ``@once_differentiable`` (mmcv's deformable convs): a double
    backward through them is not an error but silently drops their second
    derivatives, so every layer before them would get a zero trace."""
    found, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        function = getattr(node, '_forward_cls', None)
        if function is not None and getattr(
                function.backward, '__code__', None) is _ONCE_DIFFERENTIABLE \
                and function.__name__ not in found:
            found.append(function.__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _rademacher(tensor, generator):
    return torch.randint(0, 2, tensor.shape, generator=generator).to(
        tensor) * 2 - 1


class _AutogradProducts:
    """Hessian-vector products by double backward of one batch's loss."""

    def __init__(self, loss, tensors, per_tensor):
        grads = torch.autograd.grad(loss, tensors, create_graph=True,
                                    allow_unused=True)
        # a tensor unused by the loss, or one the loss is linear in: H = 0
        self.pairs = [(i, g) for i, g in enumerate(grads)
                      if g is not None and g.requires_grad]
        self.indices = [i for i, _ in self.pairs]
        self.tensors, self.per_tensor = tensors, per_tensor

    def __call__(self, vs):
        """``(H v)_i`` for each traced index ``i`` (None: zero)."""
        tensors = self.tensors
        if self.per_tensor:  # v is zero outside tensor i: H_ii v_i alone
            return [torch.autograd.grad(g, tensors[i], v, retain_graph=True,
                                        allow_unused=True)[0]
                    for (i, g), v in zip(self.pairs, vs)]
        # one product for all: the blocks H_ij v_j add to (H v)_i
        every = torch.autograd.grad([g for _, g in self.pairs], tensors, vs,
                                    retain_graph=True, allow_unused=True)
        return [every[i] for i in self.indices]


class _FiniteDifferenceProducts:
    """Hessian-vector products as central differences of gradients,
    ``(g(w + eps v) - g(w - eps v)) / (2 eps)``, for losses that autograd
    cannot differentiate twice (``once_differentiable_ops``): two forwards
    and backwards per product. ``eps`` is relative to the weights' RMS
    (``_step``), so every layer gets the same relative step.

    The perturbed forwards see every mmdrq quantizer as its
    straight-through linearisation at the reference forward (``_Linearised
    Quantizers``), so the products are those of the same STE-linearised
    network that the double backward differentiates: a rounding flipped by
    the step would otherwise add a jump of a whole grid step."""

    def __init__(self, loss_fn, batch, tensors, per_tensor):
        self.quantizers = _LinearisedQuantizers()
        with self.quantizers.recording():
            loss = loss_fn(batch)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        self.indices = [i for i, g in enumerate(grads) if g is not None]
        self.loss_fn, self.batch = loss_fn, batch
        self.tensors, self.per_tensor = tensors, per_tensor
        # per tensor, its own RMS; joint, one step for all (the difference
        # is then (H v)_i itself, not a reweighted sum of the blocks)
        groups = [[i] for i in self.indices] if per_tensor else \
            [self.indices]
        self.eps = {i: _step(tensors[j] for j in group)
                    for group in groups for i in group}

    def __call__(self, vs):
        if self.per_tensor:
            return [self._difference([i], [v])[0]
                    for i, v in zip(self.indices, vs)]
        return self._difference(self.indices, vs)

    def _difference(self, indices, vs):
        plus = self._gradients(indices, vs, 1)
        minus = self._gradients(indices, vs, -1)
        return [None if a is None else (a - b) / (2 * self.eps[i])
                for i, a, b in zip(indices, plus, minus)]

    def _gradients(self, indices, vs, sign):
        """Gradients w.r.t. ``tensors[indices]`` with each moved by
        ``sign * eps * v`` (restored exactly afterwards)."""
        tensors = [self.tensors[i] for i in indices]
        originals = [t.detach().clone() for t in tensors]
        try:
            with torch.no_grad():
                for i, t, v in zip(indices, tensors, vs):
                    t.add_(v, alpha=sign * self.eps[i])
            with self.quantizers.replaying():
                loss = self.loss_fn(self.batch)
                return torch.autograd.grad(loss, tensors, allow_unused=True)
        finally:
            with torch.no_grad():
                for t, original in zip(tensors, originals):
                    t.copy_(original)


def _step(tensors) -> float:
    """The central difference's step for ``tensors``: the cube root of the
    dtype's machine epsilon times their RMS (1 if they are all zero)."""
    tensors = [t.detach() for t in tensors]
    squares = sum(float(t.double().pow(2).sum()) for t in tensors)
    rms = math.sqrt(squares / sum(t.numel() for t in tensors))
    step = max(torch.finfo(t.dtype).eps for t in tensors) ** (1 / 3)
    return step * (rms if rms > 0 else 1.0)


class _LinearisedQuantizers:
    """Records each mmdrq quantizer call of a reference forward (input
    ``x0``, output ``q(x0)`` and the straight-through mask ``M``, the
    diagonal Jacobian of the quantizer's backward); replaying, the same
    call (by order, per quantizer) returns ``q(x0) + M * (x - x0)``. A
    call on an input already seen in the pass (a shared layer's weight, a
    backward recomputing a quantized tensor) returns the same output."""

    def __init__(self):
        self.calls = {}
        self.replay = None

    @contextlib.contextmanager
    def _hooked(self, replay: bool):
        self.replay, self.count, self.seen = replay, {}, {}
        handle = nn.modules.module.register_module_forward_hook(
            self._hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self.seen = {}

    def recording(self):
        self.calls = {}
        return self._hooked(False)

    def replaying(self):
        return self._hooked(True)

    def _hook(self, module, args, kwargs, output):
        if not isinstance(module, LearnedScaleQuantizer):
            return None
        x = args[0]
        key = (id(module), id(x))
        if key in self.seen:  # (the input is held: its id is not reused)
            return self.seen[key][1]
        if self.replay:
            calls = self.calls.get(module, [])
            index = self.count.get(module, 0)
            if index >= len(calls):
                raise RuntimeError(
                    f'{type(module).__name__} ran more often in a perturbed '
                    'forward than in the reference forward: the loss must '
                    'run the same quantizer calls on every evaluation')
            self.count[module] = index + 1
            x0, q0, mask = calls[index]
            output = q0 + mask * (x - x0)
        else:
            leaf = x.detach().requires_grad_()
            with torch.enable_grad():
                out = module.forward(leaf, *args[1:], **kwargs)
                mask, = torch.autograd.grad(out, leaf, torch.ones_like(out))
            self.calls.setdefault(module, []).append(
                (x.detach().clone(), output.detach().clone(), mask))
        self.seen[key] = (x, output)
        return output


def _batch_traces(products, tensors, max_probes, min_probes, tol,
                  generator):
    """Per-tensor traces of one batch (float64) from its Hessian-vector
    ``products`` and the probe count: probes stop once the running mean of
    the total moved by less than ``tol`` (relative) twice in a row, after
    ``min_probes``."""
    indices = products.indices
    sums = torch.zeros(len(tensors), dtype=torch.float64)
    if not indices:
        return sums, 0
    mean, calm = None, 0
    for k in range(1, max_probes + 1):
        vs = [_rademacher(tensors[i], generator) for i in indices]
        zero = torch.zeros((), dtype=torch.float64, device=vs[0].device)
        sums[indices] += torch.stack([
            zero if hv is None else (v * hv).sum(dtype=torch.float64)
            for v, hv in zip(vs, products(vs))]).cpu()
        new_mean = float(sums.sum()) / k
        change = math.inf if mean is None else abs(new_mean - mean)
        calm = calm + 1 if change <= tol * abs(new_mean) else 0
        mean = new_mean
        if k >= min_probes and calm >= 2:
            break
    return sums / k, k


def _products(loss_fn, batch, tensors, per_tensor, hvp):
    """The Hessian-vector products of one batch by ``hvp`` (``auto``:
    finite differences where the loss holds a once-differentiable op) and
    the method used."""
    if hvp != 'finite_difference':
        loss = loss_fn(batch)
        ops = once_differentiable_ops(loss)
        if not ops:
            return _AutogradProducts(loss, tensors, per_tensor), 'autograd'
        if hvp == 'autograd':
            raise ValueError(
                f"hvp='autograd' cannot take Hessian-vector products "
                f'through {ops} (once_differentiable: a double backward '
                "drops their second derivatives); use hvp='auto' or "
                "'finite_difference'")
        del loss
    return _FiniteDifferenceProducts(loss_fn, batch, tensors, per_tensor), \
        'finite_difference'


def hutchinson_traces(loss_fn: Callable, params: Dict[str, torch.Tensor],
                      batches: Iterable, max_probes: int = 10,
                      min_probes: int = 2, tol: float = 1e-3,
                      generator: Optional[torch.Generator] = None,
                      progress: Optional[Callable] = None,
                      per_tensor: bool = True,
                      hvp: str = 'auto') -> Dict[str, dict]:
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

    ``hvp`` takes the products by double backward (``autograd``), by
    central differences of gradients (``finite_difference``: two forwards
    and backwards each, for ops autograd cannot differentiate twice), or
    (``auto``) by the first unless the first batch's loss holds a
    once-differentiable op (``once_differentiable_ops``).

    Returns:
        ``{name: dict(trace, numel, trace_per_param, probes, hvp)}``;
        ``probes`` counts the Hessian-vector products of all batches,
        ``hvp`` is the method used.
    """
    _check_options(max_probes, min_probes, tol, hvp)
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
        products, hvp = _products(loss_fn, batch, tensors, per_tensor, hvp)
        traces, used = _batch_traces(products, tensors, int(max_probes),
                                     int(min_probes), tol, generator)
        del products  # its graph or records before the next batch's
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
                            probes=probes, hvp=hvp)
    return result


def quantized_weights(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The weights of ``model``'s quantized layers by module name, relative
    to the converted architecture (no ``architecture.`` for the wrapper),
    as ``mmdrq.get_bits`` and SubNet files name them."""
    layers = quantized_layers(architecture_of(model), required=True)
    return {name: module.float_weight for name, module in layers.items()}


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
        return model_loss(model, model.data_preprocessor(batch, True))

    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params.values():  # frozen stages still get a trace
            p.requires_grad_(True)
        model.eval()
        with use_bits(arch, model_bits(arch)[0]), torch.enable_grad(), \
                without_batch_augments(model.data_preprocessor):
            return hutchinson_traces(
                loss_fn, params, FirstSamples(data_loader, num_samples),
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
    content = read_json(path, f'traces file {path!r}')
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
