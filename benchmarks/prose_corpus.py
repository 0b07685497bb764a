"""A second corpus, English prose, built from what a Linux machine with Python has
offline: the Python language reference (`pydoc_data`, 79 topics), the license texts
of /usr/share/common-licenses, and the system's section-1 manual pages rendered to
plain text. Used to check that a recipe tuned on the standard library's code holds
on prose (`benchmarks/quality.py --data files:…`).

    python benchmarks/prose_corpus.py                  # → ~/.cache/tokcom_jax/prose
    python train.py --config configs/tiny.py:ar,data.source='files:~/.cache/tokcom_jax/prose/*.txt'

Files already written are kept; the printed line is the `data.source` to use.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess

from tqdm import tqdm


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default='~/.cache/tokcom_jax/prose')
  p.add_argument('--man_pages', type=int, default=1500,
                 help='section-1 manual pages to render (alphabetical; 0: none)')
  args = p.parse_args()
  out = pathlib.Path(os.path.expanduser(args.out))
  out.mkdir(parents=True, exist_ok=True)

  def write(name: str, text: str):
    if text.strip():
      (out / f'{name}.txt').write_text(text, encoding='utf-8')

  from pydoc_data.topics import topics
  for name, text in topics.items():
    write(f'python-reference-{name}', text)
  licenses = pathlib.Path('/usr/share/common-licenses')
  for path in sorted(licenses.glob('*')) if licenses.is_dir() else []:
    if path.is_file():
      write(f'license-{path.name}', path.read_text(encoding='utf-8', errors='replace'))
  pages = sorted({p.name.split('.')[0] for p in pathlib.Path('/usr/share/man/man1').glob('*')}
                 )[:args.man_pages] if args.man_pages else []
  env = dict(os.environ, MANWIDTH='80', MAN_KEEP_FORMATTING='0')
  for page in tqdm(pages, desc='manual pages'):
    if (out / f'man-{page}.txt').exists():
      continue
    rendered = subprocess.run(['man', '-P', 'cat', '1', page], env=env,
                              capture_output=True, text=True, errors='replace')
    plain = subprocess.run(['col', '-bx'], input=rendered.stdout, capture_output=True,
                           text=True).stdout
    write(f'man-{page}', plain)
  files = list(out.glob('*.txt'))
  size = sum(f.stat().st_size for f in files)
  print(f'{len(files)} files, {size / 1e6:.1f} MB: data.source=files:{out}/*.txt')


if __name__ == '__main__':
  main()
