"""The conversion report: one typed row per decision of ``quantize_model``
and of its passes, so that coverage, surveys and tests read fields, not the
words of a logged table."""
from typing import List, NamedTuple, Sequence

# decisions on a conv / linear / attention layer; the passes' rows carry
# their own kind ('switchable BN', 'transitional BN', 'per FPN level', ...)
QUANTIZED = 'quantized'
FP = 'fp'
# the reasons of ``skip_first_last``: layers the defaults keep FP on purpose
FIRST_LAYER = 'first layer (skip_first_last)'
PREDICTION_LAYER = 'prediction layer (skip_first_last)'


class ConversionRow(NamedTuple):
    """``decision``: ``QUANTIZED``, ``FP`` or a pass's kind; ``detail``:
    the bits (quantized), why (FP), or what the pass did; ``by_default``:
    kept FP by ``skip_first_last`` (the first and prediction layers)."""
    layer: str
    layer_type: str
    decision: str
    detail: str
    by_default: bool = False

    @property
    def status(self) -> str:
        """The table's words for the decision."""
        if self.decision == QUANTIZED:
            return f'quantized {self.detail}'
        if self.decision == FP:
            return f'FP: {self.detail}'
        return self.detail


def format_report(rows: Sequence[ConversionRow]) -> str:
    """The logged table: layer | type | status."""
    cells = [(r.layer, r.layer_type, r.status) for r in rows]
    header = ('layer', 'type', 'status')
    widths = [max(len(c[i]) for c in cells + [header]) for i in range(3)]
    fmt = ' | '.join('{:<%d}' % w for w in widths)
    lines = [fmt.format(*header), '-+-'.join('-' * w for w in widths)]
    lines += [fmt.format(*c) for c in cells]
    return '\n'.join(lines)


def report_of(model) -> List[ConversionRow]:
    """The rows of a converted model (empty for one never converted)."""
    return list(getattr(model, 'mmdrq_report', []))
