#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb (nbdev's `nbdev-readme` needs Quarto, which is not available offline).

Markdown cells are copied as they are; code cells are shown as ```python blocks without their `#|`
directives; `#| hide` cells are left out; text outputs (stream and plain text) are shown under their
cell, rich outputs (tables, images) are not. `--check` exits 1 if README.md is out of step."""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def _directives(src):
    return [l[3:].strip() for l in src.splitlines() if l.startswith('#|')]

def _code(src): return '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip('\n')

def _outputs(cell):
    res = []
    for o in cell.get('outputs', []):
        if o.get('output_type') == 'stream' and o.get('name') == 'stdout':
            text = ''.join(o['text']).replace('\u2588', '')          # fastprogress's bar glyph
            res.append('\n'.join(l.split('\r')[-1].rstrip() for l in text.split('\n')))  # keep what a terminal shows
        elif o.get('output_type') == 'execute_result' and 'text/html' not in o.get('data', {}) \
                and 'image/png' not in o.get('data', {}):
            res.append(''.join(o.get('data', {}).get('text/plain', '')))
    return '\n'.join(r.rstrip('\n') for r in res if r.strip())

def readme(nb_path=ROOT/'nbs'/'index.ipynb') -> str:
    cells = json.loads(Path(nb_path).read_text())['cells']
    parts = ['<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->']
    for c in cells:
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown': parts.append(src.strip('\n'))
        elif c['cell_type'] == 'code':
            if 'hide' in _directives(src): continue
            code = _code(src)
            if code: parts.append(f"```python\n{code}\n```")
            out = _outputs(c)
            if out: parts.append(f"```\n{out}\n```")
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    text, dest = readme(), ROOT/'README.md'
    if '--check' in sys.argv[1:]:
        if not dest.exists() or dest.read_text() != text:
            sys.exit("README.md is out of step with nbs/index.ipynb: run `python tools/make_readme.py`.")
    else: dest.write_text(text)
