"""The language-model path: the corpus writer holds validation texts out
whole, the dataset's blocks cover its split, the metric's loss and
perplexity equal a float64 reference, and a tiny Llama trains FP32 then
{8,6,4,2} QAT through tools/train.py and tests per bit through
tools/test.py."""
import json
import math
import os
import os.path as osp
import re

import pytest
import torch

from conftest import ROOT, TOOLS, run_tool, tool_error

pytest.importorskip('transformers')

from mmdrq.llm import CausalLM, CharLMDataset, PerplexityMetric  # noqa: E402
from mmdrq.llm.corpus import (VAL_EVERY, _pydoc_texts,  # noqa: E402
                              write_char_corpus)

CONFIGS = osp.join(ROOT, 'configs', 'language')
TINY = dict(model_type='llama', vocab_size=128, hidden_size=32,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32,
            tie_word_embeddings=False)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('text') / 'pydoc')
    return root, write_char_corpus(root)


def test_corpus_holds_every_tenth_text_out_whole(corpus):
    root, counts = corpus
    texts = [t.strip() for _, t in _pydoc_texts()]
    with open(osp.join(root, 'val.txt'), encoding='utf-8') as f:
        val = f.read()
    with open(osp.join(root, 'train.txt'), encoding='utf-8') as f:
        train = f.read()
    held = texts[VAL_EVERY - 1::VAL_EVERY]
    assert val == '\n\n'.join(held) + '\n'
    assert counts['val'] == len(val) and counts['train'] == len(train)
    # a held-out text of some length is nowhere in the training text
    assert not any(t in train for t in held if len(t) > 200)
    with open(osp.join(root, 'vocab.json'), encoding='utf-8') as f:
        assert json.load(f) == sorted(set(train) | set(val))


@pytest.mark.parametrize('args, error, message', [
    (dict(corpus='pydocs'), ValueError, "corpus must be one of .*'pydocs'"),
    (dict(corpus='shakespeare'), ValueError, 'archive .* needed by'),
    (dict(corpus='pydoc', archive='x.tar.gz'), ValueError, 'only by'),
    (dict(corpus='shakespeare', archive='missing.tar.gz'), FileNotFoundError,
     'missing.tar.gz'),
])
def test_corpus_refuses_bad_arguments(tmp_path, args, error, message):
    with pytest.raises(error, match=message):
        write_char_corpus(str(tmp_path / 'text'), **args)
    assert not os.listdir(tmp_path)


def test_dataset_blocks_cover_the_validation_text(corpus):
    root, counts = corpus
    val = CharLMDataset(root, 'val', block_size=64)
    vocab = val.metainfo['vocab']
    with open(osp.join(root, 'val.txt'), encoding='utf-8') as f:
        text = f.read()
    # consecutive blocks: each predicted character exactly once
    predicted = ''.join(''.join(vocab[i] for i in val[k]['inputs'][1:])
                        for k in range(len(val)))
    assert predicted == text[1:1 + 64 * len(val)]
    assert len(val) == (len(text) - 1) // 64
    train = CharLMDataset(root, 'train', block_size=16, num_samples=5, seed=3)
    again = CharLMDataset(root, 'train', block_size=16, num_samples=5, seed=3)
    assert [train[i]['inputs'].tolist() for i in range(5)] == \
        [again[i]['inputs'].tolist() for i in range(5)]
    with pytest.raises(ValueError, match='has 103 characters, more than the '
                       "model's vocab_size=64"):
        CharLMDataset(root, 'val', vocab_size=64)


def test_metric_is_the_mean_token_cross_entropy(corpus):
    root, _ = corpus
    torch.manual_seed(0)
    model = CausalLM(TINY).eval()
    data = CharLMDataset(root, 'val', block_size=16)
    batches = [torch.stack([data[i]['inputs'] for i in range(s, s + 3)])
               for s in (0, 3)]
    metric = PerplexityMetric()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs in batches:
            metric.process(None, model(inputs, mode='predict'))
            logits = model(inputs[:, :-1], mode='tensor').double()
            log_p = torch.log_softmax(logits, -1)
            total -= log_p.gather(-1, inputs[:, 1:, None]).sum().item()
            count += inputs[:, 1:].numel()
    result = metric.compute_metrics(metric.results)
    assert result['loss'] == pytest.approx(total / count, rel=1e-5)
    assert result['perplexity'] == pytest.approx(math.exp(total / count),
                                                 rel=1e-5)
    with pytest.raises(ValueError, match="mode must be .* got 'logits'"):
        model(batches[0], mode='logits')


@pytest.mark.parametrize('argv, message', [
    (['--prompt', 'caf\u00e9'], "--prompt has characters the corpus lacks: "
     "\\['\u00e9'\\]"),
    (['--tokens', '-1'], '--tokens must be >= 0, got -1'),
])
def test_generate_refuses_bad_flags_before_loading(corpus, argv, message):
    root, _ = corpus
    error = tool_error('generate', osp.join(CONFIGS, 'llama_char_drq-8642.py'),
                       'missing.pth', *argv, '--cfg-options',
                       f'test_dataloader.dataset.data_root={root}')
    assert re.search(message, error), error


@pytest.mark.slow
def test_fp32_then_qat_then_per_bit_test_through_the_tools(corpus, tmp_path):
    root, _ = corpus
    tiny = [f'model.config.{k}={v}' for k, v in TINY.items()
            if k != 'model_type'] + [
        f'{split}_dataloader.dataset.data_root={root}'
        for split in ('train', 'val', 'test')] + [
        'train_dataloader.batch_size=4',
        'train_dataloader.dataset.block_size=16',
        'val_dataloader.dataset.block_size=16',
        'test_dataloader.dataset.block_size=16',
        'default_hooks.logger.interval=1']
    fp_work, qat_work = tmp_path / 'fp32', tmp_path / 'qat'
    run_tool(osp.join(TOOLS, 'train.py'),
             osp.join(CONFIGS, 'llama_char_fp32.py'), '--work-dir', fp_work,
             '--cfg-options', 'train_cfg.max_iters=6',
             'train_cfg.val_interval=6', 'default_hooks.checkpoint.interval=6',
             *tiny)
    qat_tiny = [o.replace('model.config.', 'model.architecture.config.')
                for o in tiny]
    qat = osp.join(CONFIGS, 'llama_char_drq-8642.py')
    _, train_log = run_tool(osp.join(TOOLS, 'train.py'), qat, '--work-dir',
                            qat_work,
             '--cfg-options', f'load_from={fp_work / "iter_6.pth"}',
             'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
             'default_hooks.checkpoint.interval=2', *qat_tiny)
    out = tmp_path / 'metrics.json'
    _, log = run_tool(osp.join(TOOLS, 'test.py'), qat,
                      str(qat_work / 'iter_2.pth'), '--work-dir',
                      tmp_path / 'test', '--out', out, '--cfg-options',
                      *qat_tiny)
    with open(out) as f:
        metrics = json.load(f)
    for bit in (8, 6, 4, 2):
        loss = metrics[f'lm/loss@w{bit}a{bit}']
        assert 0 < loss < math.log(128)
        assert metrics[f'lm/perplexity@w{bit}a{bit}'] == pytest.approx(
            math.exp(loss), rel=1e-4)
    assert '| w2a2 |' in log
    # the decoder's Linear layers quantized, the LM head FP
    rows = [line.split('|') for line in train_log.splitlines()
            if line.count('|') == 2]
    decisions = {r[0].strip(): r[2].strip() for r in rows}
    assert decisions['lm.lm_head'].startswith('FP: matches skip pattern')
    assert decisions['lm.model.layers.0.self_attn.q_proj'] == \
        'quantized [8, 6, 4, 2]'
    assert decisions['lm.model.layers.1.mlp.down_proj'] == \
        'quantized [8, 6, 4, 2]'
    # one export folder; ONNX Runtime's N-bit MatMul gives PyTorch's
    # per-bit losses, and the same greedy text as the PyTorch model
    onnx_dir = tmp_path / 'onnx'
    run_tool(osp.join(TOOLS, 'export_onnx.py'), qat,
             str(qat_work / 'iter_2.pth'), '--out-dir', onnx_dir,
             '--cfg-options', *qat_tiny)
    ort_out = tmp_path / 'ort_metrics.json'
    run_tool(osp.join(TOOLS, 'test.py'), qat, onnx_dir, '--backend',
             'onnxruntime', '--ort-kernels', 'nbits', '--work-dir',
             tmp_path / 'ort', '--out', ort_out, '--cfg-options', *qat_tiny)
    with open(ort_out) as f:
        ort_metrics = json.load(f)
    for bit in (8, 6, 4, 2):
        key = f'lm/loss@w{bit}a{bit}'
        assert ort_metrics[key] == pytest.approx(metrics[key], abs=1e-4)
    texts = []
    for source in (qat_work / 'iter_2.pth', onnx_dir):
        text_out = tmp_path / f'text_{len(texts)}.json'
        run_tool(osp.join(TOOLS, 'generate.py'), qat, source, '--bit', '4',
                 '--prompt', 'The ', '--tokens', '20', '--out', text_out,
                 '--cfg-options', *qat_tiny)
        with open(text_out) as f:
            texts.append(json.load(f))
    assert texts[0] == texts[1]
    assert texts[0]['bit'] == 4 and len(texts[0]['text']) == 20
