"""PS-KD soft targets and their use in the QAT wrapper."""
import pytest
import torch
import torch.nn.functional as F
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper

from mmdrq.models import MultiPrecisionQAT
from mmdrq.models.pskd import PSKDTargets, soft_cross_entropy


def set_epoch(epoch, max_epochs=10):
    hub = MessageHub.get_current_instance()
    hub.update_info('epoch', epoch)
    hub.update_info('max_epochs', max_epochs)


def test_targets_follow_previous_epoch_predictions():
    g = torch.Generator().manual_seed(7)
    pskd = PSKDTargets(num_classes=5, alpha=0.7)
    labels, index = torch.tensor([1, 4, 0]), torch.tensor([3, 0, 6])
    set_epoch(0)
    # no previous epoch yet: plain one-hot
    torch.testing.assert_close(pskd.targets(labels, index),
                               F.one_hot(labels, 5).float())
    logits = torch.randn(3, 5, generator=g, dtype=torch.float64)
    pskd.record(logits, index)
    set_epoch(1)
    targets = pskd.targets(labels, index)
    a_t = 0.7 * 2 / 10
    expected = (1 - a_t) * F.one_hot(labels, 5).double() + \
        a_t * logits.softmax(1)
    # predictions are kept in float16
    torch.testing.assert_close(targets.double(), expected, atol=1e-4,
                               rtol=1e-3)
    # a sample not predicted last epoch keeps its one-hot target
    torch.testing.assert_close(pskd.targets(torch.tensor([2]),
                                            torch.tensor([5])),
                               F.one_hot(torch.tensor([2]), 5).float())
    state = pskd.state_dict()
    again = PSKDTargets(num_classes=5, alpha=0.7)
    again.load_state_dict(state)
    torch.testing.assert_close(again.targets(labels, index), targets)
    # a checkpoint with float32 tables (older runs) loads as float16
    older = {k: v.float() if v.is_floating_point() and v.dim() == 2 else v
             for k, v in state.items()}
    again.load_state_dict(older)
    assert again.previous.dtype == torch.float16
    torch.testing.assert_close(again.targets(labels, index), targets)


def _record_on_rank(rank, world, port, folder):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}',
                            rank=rank, world_size=world)
    try:
        set_epoch(0)
        pskd = PSKDTargets(num_classes=4)
        # rank 0 holds 3 samples, rank 1 two (an uneven last batch)
        index = torch.tensor([rank + world * i for i in range(3 - rank)])
        logits = torch.arange(12.).view(3, 4)[:3 - rank] * (rank + 1)
        pskd.record(logits, index)
        torch.save(dict(table=pskd.current, seen=pskd.current_seen),
                   f'{folder}/{rank}.pth')
    finally:
        dist.destroy_process_group()


def test_every_rank_records_every_sample(tmp_path):
    """Two gloo ranks record different samples, and different numbers of
    them; each keeps all of them."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    mp.spawn(_record_on_rank, args=(2, port, str(tmp_path)), nprocs=2)
    expected = torch.empty(5, 4)
    for rank in range(2):
        logits = torch.arange(12.).view(3, 4)[:3 - rank] * (rank + 1)
        expected[rank::2] = logits.softmax(1)
    for rank in range(2):
        saved = torch.load(tmp_path / f'{rank}.pth')
        assert saved['seen'].all() and saved['table'].shape == (5, 4)
        assert saved['table'].dtype == torch.float16
        torch.testing.assert_close(saved['table'].float(), expected,
                                   atol=1e-3, rtol=1e-3)


def test_soft_cross_entropy_matches_reference():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, generator=g, dtype=torch.float64)
    targets = torch.rand(4, 6, generator=g, dtype=torch.float64)
    targets /= targets.sum(1, keepdim=True)
    expected = -(targets * torch.log(logits.softmax(1))).sum(1).mean()
    torch.testing.assert_close(soft_cross_entropy(logits, targets), expected)


def test_wrapper_trains_on_soft_targets(small_classifier):
    from mmpretrain.structures import DataSample
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]),
                              distill=dict(alpha=0.7))
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.0))
    data = dict(
        inputs=[torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
                for _ in range(2)],
        data_samples=[DataSample(metainfo=dict(sample_idx=i))
                      .set_gt_label(i) for i in (0, 1)])
    # DDP leaves the tables alone (they differ in size between ranks)
    assert {f'pskd.{n}' for n, _ in model.pskd.named_buffers()} <= set(
        model._ddp_params_and_buffers_to_ignore)
    set_epoch(0, 2)
    first = model.train_step(data, wrapper)
    assert model.pskd.current_seen[:2].all()
    assert torch.isfinite(first['loss@w4a4'])
    set_epoch(1, 2)
    second = model.train_step(data, wrapper)
    assert model.pskd.previous_seen[:2].all()
    # lr 0 and train-mode BN: the w8 logits are the same in both steps, so
    # the second step's w8 loss is the soft CE against a_1 = 0.7 * 2 / 2
    with torch.no_grad():
        logits = model(**model.data_preprocessor(data, True), mode='tensor')
    onehot = F.one_hot(torch.tensor([0, 1]), 10).float()
    targets = 0.3 * onehot + 0.7 * logits.softmax(1)
    # the previous predictions were kept in float16
    torch.testing.assert_close(second['loss@w8a8'],
                               soft_cross_entropy(logits, targets),
                               rtol=1e-4, atol=1e-4)


def test_distill_needs_a_classifier():
    from torch import nn

    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)
            self.conv2 = nn.Conv2d(3, 3, 3)
            self.conv3 = nn.Conv2d(3, 3, 3)
    with pytest.raises(ValueError, match='head.num_classes'):
        MultiPrecisionQAT(NoHead(), dict(bits=[8, 4]), distill=dict())


def test_wrapper_state_dict_keeps_the_tables(small_classifier):
    """The wrapper's own keys (pskd.*) stay where they are on load; only a
    bare model's keys are moved under architecture. (a resumed PS-KD run
    lost its tables as unexpected architecture.pskd.* keys)"""
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]),
                              distill=dict(alpha=0.7))
    set_epoch(0)
    model.pskd.record(torch.randn(2, 10), torch.tensor([0, 3]))
    state = model.state_dict()
    again = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]),
                              distill=dict(alpha=0.7))
    again.load_state_dict(state, strict=True)
    for key, value in model.pskd.state_dict().items():
        assert torch.equal(again.pskd.state_dict()[key], value), key
