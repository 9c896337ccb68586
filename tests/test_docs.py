"""Every pointer of the code to docs/method.md names a section it has."""
import glob
import os.path as osp
import re

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# "(docs/method.md, Section; Other section)", across line breaks
POINTER = re.compile(r'docs/method\.md,\s+([^)]+)\)')
# a pointer without the path or the section ("method.md §3")
BARE = re.compile(r'(?<!docs/)method\.md|docs/method\.md(?!,\s)')


def sections():
    with open(osp.join(ROOT, 'docs', 'method.md')) as f:
        return {line[3:].strip() for line in f if line.startswith('## ')}


def code_texts():
    """(path, text with line breaks and comment marks folded) of the code."""
    files = [p for folder in ('mmdrq', 'tools', 'configs', 'benchmarks')
             for p in glob.glob(osp.join(ROOT, folder, '**', '*.py'),
                                recursive=True)]
    for path in files:
        with open(path) as f:
            yield osp.relpath(path, ROOT), re.sub(r'\s*\n\s*#?\s*', ' ',
                                                  f.read())


def pointers():
    for path, text in code_texts():
        for match in POINTER.finditer(text):
            for name in match.group(1).split(';'):
                yield path, name.strip()


def test_code_points_to_existing_sections():
    found = list(pointers())
    assert len(found) >= 10  # the quantizers, BN, ALRS, PS-KD, search...
    missing = [(path, name) for path, name in found
               if name not in sections()]
    assert not missing, missing
    bare = [path for path, text in code_texts() if BARE.search(text)]
    assert not bare, bare


def test_readme_links_the_method():
    with open(osp.join(ROOT, 'README.md')) as f:
        assert '(docs/method.md)' in f.read()


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens
    dropped, spaces to hyphens."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def test_every_link_between_pages_reaches_a_file_and_heading():
    """README.md and docs/*.md: each relative link ``[text](page.md#part)``
    names a file that exists and, with ``#part``, one of its headings."""
    pages = [osp.join(ROOT, 'README.md')] + sorted(
        glob.glob(osp.join(ROOT, 'docs', '*.md')))
    broken, count = [], 0
    for page in pages:
        with open(page) as f:
            text = f.read()
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+://|mailto:', target):
                continue
            count += 1
            path, _, part = target.partition('#')
            full = osp.normpath(osp.join(osp.dirname(page), path)) \
                if path else page
            if not osp.exists(full):
                broken.append((osp.relpath(page, ROOT), target))
            elif part and full.endswith('.md'):
                with open(full) as f:
                    headings = {anchor(line.lstrip('#'))
                                for line in f if line.startswith('#')}
                if part not in headings:
                    broken.append((osp.relpath(page, ROOT), target))
    assert count >= 50
    assert broken == []
