"""PS-KD self-distillation targets for classification (docs/method.md,
PS-KD).

Soft target of a sample at epoch t: ``(1 - a_t) onehot(y) + a_t p_prev(x)``
with ``p_prev`` the highest bit's softmax for that sample in the previous
epoch and ``a_t = alpha * (t + 1) / E``. Predictions are kept per sample
index (``sample_idx`` of the data samples) in buffers, so they resume.
"""
import torch
import torch.nn.functional as F
from mmengine.dist import all_gather, get_world_size
from mmengine.logging import MessageHub
from torch import nn

# predictions are stored in half precision: two ImageNet tables (1.28M
# samples x 1000 classes) take 5 GB rather than 10 GB
TABLE_DTYPE = torch.float16


class PSKDTargets(nn.Module):
    """Holds last epoch's and this epoch's predictions, per sample index.

    Args:
        num_classes: classifier outputs.
        alpha: final weight of the previous predictions (0.7 in PS-KD).
    """

    def __init__(self, num_classes: int, alpha: float = 0.7):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f'distill.alpha must lie in [0, 1], got {alpha}')
        self.num_classes = num_classes
        self.alpha = alpha
        self.register_buffer('epoch', torch.tensor(-1))
        for name in ('previous', 'current'):
            self.register_buffer(name, torch.zeros(0, num_classes,
                                                   dtype=TABLE_DTYPE))
            self.register_buffer(name + '_seen', torch.zeros(0,
                                                             dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # buffers grow with the dataset: take the saved sizes
        for name in ('previous', 'current', 'previous_seen', 'current_seen'):
            if prefix + name in state_dict:
                saved = state_dict[prefix + name]
                # float32 tables of older checkpoints load as float16
                setattr(self, name, torch.empty_like(
                    saved, device=getattr(self, name).device,
                    dtype=torch.bool if saved.dtype == torch.bool
                    else TABLE_DTYPE))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _grow(self, size: int):
        for name in ('previous', 'current'):
            table, seen = getattr(self, name), getattr(self, name + '_seen')
            if table.shape[0] < size:
                extra = size - table.shape[0]
                setattr(self, name, torch.cat(
                    [table, table.new_zeros(extra, self.num_classes)]))
                setattr(self, name + '_seen', torch.cat(
                    [seen, seen.new_zeros(extra)]))

    def _sync_epoch(self):
        """Start of a new epoch: this epoch's predictions become previous."""
        hub = MessageHub.get_current_instance()
        epoch = int(hub.get_info('epoch', 0))
        if epoch != int(self.epoch):
            if int(self.epoch) >= 0:
                self.previous, self.previous_seen = self.current, \
                    self.current_seen
                self.current = torch.zeros_like(self.previous)
                self.current_seen = torch.zeros_like(self.previous_seen)
            self.epoch.fill_(epoch)
        return epoch, int(hub.get_info('max_epochs', 1) or 1)

    def targets(self, labels: torch.Tensor, index: torch.Tensor):
        """Soft targets ``(N, C)`` of the samples ``index`` with ``labels``."""
        epoch, max_epochs = self._sync_epoch()
        self._grow(int(index.max()) + 1)
        onehot = F.one_hot(labels, self.num_classes).float()
        a_t = self.alpha * (epoch + 1) / max_epochs
        idx = index.to(self.previous.device)
        prev = self.previous[idx].to(onehot)
        seen = self.previous_seen[idx].to(onehot.device).unsqueeze(1)
        return torch.where(seen, (1 - a_t) * onehot + a_t * prev, onehot)

    @torch.no_grad()
    def record(self, logits: torch.Tensor, index: torch.Tensor):
        """Keep the softmax of ``logits`` for the samples ``index``. Under
        DDP every rank keeps every rank's samples: the sampler deals a
        sample to any rank in the next epoch."""
        probs = logits.detach().float().softmax(1).to(TABLE_DTYPE)
        probs = _gather_rows(probs)
        index = _gather_rows(index.to(probs.device)).cpu()
        self._grow(int(index.max()) + 1)
        idx = index.to(self.current.device)
        self.current[idx] = probs.to(self.current)
        self.current_seen[idx] = True


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated; ranks may hold different numbers
    (an uneven last batch), so each pads to the largest for the gather."""
    if get_world_size() == 1:
        return tensor
    sizes = [int(n) for n in all_gather(torch.tensor(
        [tensor.shape[0]], device=tensor.device))]
    padded = tensor.new_zeros(max(sizes), *tensor.shape[1:])
    padded[:tensor.shape[0]] = tensor
    return torch.cat([part[:n] for part, n in zip(all_gather(padded), sizes)])


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor):
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
