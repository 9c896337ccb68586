"""The fused fake-quant kernels of each device type, built at their first
call: C++ on the CPU (``cpu_kernels``), Inductor's Triton on CUDA. Each
takes ``x``, its scale (one value, or one per row: dim 0) and a
``functional._QuantSpec`` and computes what ``functional._forward`` /
``_fused_backward`` do: outputs and ``grad_x`` in ``x``'s shape, the scale
gradient as ``(rows, 1)``, or ``(1, 1)`` summed over the rows."""
import warnings

import torch


# Graphs each Inductor kernel may keep: dtypes x (one scale | one per row)
# x number of targets x Inductor's size classes; a model needs a handful,
# a test session more.
_KERNEL_GRAPHS = 64


class InductorKernels:
    """CUDA: ``functional._forward`` and ``_fused_backward`` compiled by
    Inductor (Triton) with dynamic shapes, the numbers as cached tensors."""

    def __init__(self):
        from . import functional
        self.fns = (torch.compile(functional._forward, dynamic=True),
                    torch.compile(functional._fused_backward, dynamic=True))
        self._scale_grad = functional._scale_grad

    def _call(self, which, args):
        """With room for the kernels' own graphs, whatever Dynamo's global
        recompile limit (meant for user code) is."""
        config = torch._dynamo.config
        limit = config.recompile_limit
        config.recompile_limit = max(limit, _KERNEL_GRAPHS)
        try:
            return self.fns[which](*args)
        finally:
            config.recompile_limit = limit

    def forward(self, x, scale, spec):
        x2, s2 = _as_rows(x, scale)
        outs = self._call(0, (x2, s2, *spec.tensors(x2, s2)))
        return tuple(out.view(x.shape) for out in outs)

    def backward(self, grads, x, scale, spec, keep, whole):
        x2, s2 = _as_rows(x, scale)
        grads = [g.reshape(x2.shape).detach() for g in grads]
        grad_x, partials = self._call(1, (
            grads, x2, s2, *spec.tensors(x2, s2, keep),
            spec.residual_code(s2)))
        grad_s = self._scale_grad(partials, spec.grad_scales(keep))
        return grad_x.view(x.shape), \
            grad_s.sum(dim=0, keepdim=True) if whole else grad_s


def _as_rows(x, scale):
    """2-d ``x`` and ``(rows, 1)`` scale, detached: a view's link to its
    base would add guards (and recompiles) to the compiled kernels."""
    rows = 1 if scale.numel() == 1 else x.shape[0]
    return x.reshape(rows, -1).detach(), scale.reshape(rows, 1).detach()


class CpuKernels:
    """CPU: ``csrc/fake_quant.cpp`` (``cpu_kernels``), which takes ``x`` and
    the scale as they are (layout and the scale's dtype handled there)."""

    def __init__(self):
        from . import cpu_kernels
        self.ext = cpu_kernels.load()

    def forward(self, x, scale, spec):
        return self.ext.forward(x, scale, *spec.kernel_numbers())

    def backward(self, grads, x, scale, spec, keep, whole):
        return self.ext.backward(grads, x, scale, *spec.kernel_numbers(keep),
                                 spec.residual == 'first_rounding', whole)


# device type -> its kernels' class; built at the first call on it
KERNELS = {'cpu': CpuKernels, 'cuda': InductorKernels}
# device type -> the built kernels, or False once they failed to build
_kernels = {}


def usable(device_type: str) -> bool:
    """Whether ``device_type`` has kernels that did not fail to build."""
    return device_type in KERNELS and _kernels.get(device_type) is not False


def run(device_type: str, method: str, strict: bool, *args):
    """Call a fused kernel of ``device_type``. The first failure to build
    them (no compiler) raises if ``strict``, else switches to the torch
    path on that device for good, with a warning, and gives None."""
    kernels = _kernels.get(device_type)
    if kernels:
        return getattr(kernels, method)(*args)
    try:
        kernels = KERNELS[device_type]()
        out = getattr(kernels, method)(*args)
    except Exception as error:  # noqa: BLE001 - any build failure
        if strict:
            raise
        warnings.warn(f'mmdrq: fused fake quantization is unavailable on '
                      f'{device_type} ({type(error).__name__}: {error}); '
                      f'using the torch path (set MMDRQ_FAKE_QUANT=torch '
                      f'to skip the try)')
        _kernels[device_type] = False
        return None
    _kernels[device_type] = kernels
    return out


def failed(device_type: str = 'cpu') -> bool:
    """Whether the fused kernels of ``device_type`` failed to build."""
    return _kernels.get(device_type) is False
