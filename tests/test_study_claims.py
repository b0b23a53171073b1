"""The studies' prose against their saved runs: every figure quoted in a findings sentence checked here is
recomputed from the runs' JSON files, and the word that gives its sign ("higher", "lower", "spans zero", ...) must
agree with the recomputed sign, so a sentence that says "higher" where the runs say lower fails."""
import json, re
from pathlib import Path

import numpy as np
import pytest
from reference import paired

ROOT = Path(__file__).resolve().parent.parent
TUT = ROOT/'nbs'/'tutorials'
NUM = r'([+−-]?\d+\.\d+)'
IV = NUM + r' \[' + NUM + r', ' + NUM + r'\]'

def num(s): return float(s.replace('−', '-'))

def markdown(nb):
    "The notebook's markdown, one string, line breaks as spaces"
    cells = json.loads((TUT/nb).read_text())['cells']
    return ' '.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown').replace('\n', ' ')

def runs(folder):
    "{(method, images per class, fine_tune epochs or None, seed): run}"
    out = {}
    for f in (TUT/folder).glob('*_s[0-9].json'):
        r = json.loads(f.read_text())
        out[r['method'], r['n_per_class'], r.get('epochs'), r['seed']] = r
    return out

def diff(R, a, b, n, e, col, k=100, col_b=None, seeds=(0, 1, 2)):
    "a − b (paired by seed), rounded as the prose rounds"
    return paired([k*R[a, n, e, s][col] for s in seeds], [k*R[b, n, e, s][col_b or col] for s in seeds])

def close(text_iv, d, nd=1):
    m, lo, hi = map(num, text_iv)
    return (round(d['mean'], nd), round(d['lo'], nd), round(d['hi'], nd)) == (round(m, nd), round(lo, nd), round(hi, nd))

def sign_word(w, mean):
    "Whether `w` says what the sign of `mean` is"
    up, down = {'higher', 'worse', 'cost', 'raised', 'above'}, {'lower', 'better', 'cut', 'lowered', 'below'}
    assert w in up | down, w
    return (w in up) == (mean > 0)

def spans(w, d):
    "'spans zero' when the interval contains 0, 'excludes zero'/'clear' otherwise"
    return (w == 'spans zero') == (d['lo'] <= 0 <= d['hi'])


# -------------------------------------------------------------------------------------- the fine-tuning study
FT = 'finetune_study.ipynb'

@pytest.fixture(scope='module')
def ft(): return runs('finetune_study'), markdown(FT)

def test_finetune_setup_matches_runs(ft):
    "The sizes and seeds the page names are those of the saved runs"
    R, md = ft
    sizes = sorted({k[1] for k in R})
    assert re.search(r'`n` = ' + ', '.join(map(str, sizes[:-1])) + f' or {sizes[-1]}', md)
    for n in (20, 50, 200):
        for e in (8, 3): assert {k[3] for k in R if k[:3] == ('cskd', n, e)} == {0, 1, 2}
    assert {k[3] for k in R if k[:3] == ('cskd', 500, 8)} == {0}
    assert 'over 3 seeds' in md

def test_finetune_every_pair_costs_error(ft):
    "'(18 of 18 seed pairs worse than cross-entropy)'"
    R, md = ft
    m = re.search(r'\((\d+) of (\d+) seed pairs (worse|better) than cross-entropy\)', md)
    assert m
    pairs = [(R['cskd', n, e, s]['test_err'], R['ce', n, e, s]['test_err']) for n in (20, 50, 200) for e in (8, 3) for s in range(3)]
    worse = sum(a > b for a, b in pairs)
    assert int(m[2]) == len(pairs)
    assert int(m[1]) == (worse if m[3] == 'worse' else len(pairs) - worse)

def test_finetune_error_table(ft):
    "The table of CS-KD − cross-entropy top-1 error, both schedules"
    R, md = ft
    for n in (20, 50, 200):
        m = re.search(rf'\| {n} \| {IV} \| {IV} \|', md)
        assert m, n
        assert close(m.groups()[:3], diff(R, 'cskd', 'ce', n, 8, 'test_err'))
        assert close(m.groups()[3:], diff(R, 'cskd', 'ce', n, 3, 'test_err'))

def test_finetune_200_error_sentence(ft):
    "At 200 images per class: the error's sign word and whether its interval spans zero"
    R, md = ft
    m = re.search(r'its error was (higher|lower) on\s+the mean, ' + IV + r' points, an interval that (spans zero|excludes zero)', md)
    assert m
    d = diff(R, 'cskd', 'ce', 200, 8, 'test_err')
    assert close(m.groups()[1:4], d) and sign_word(m[1], d['mean']) and spans(m[5], d)

def test_finetune_temperature_sentence(ft):
    "CS-KD − (CE + temperature): NLL at every size; ECE lower on the mean everywhere, clear only where the page says"
    R, md = ft
    m = re.search(r'NLL: ' + IV + ', ' + IV + ', ' + IV, md)
    for i, n in enumerate((20, 50, 200)):
        d = diff(R, 'cskd', 'ce', n, 8, 'test_nll', k=1, col_b='ts_nll')
        assert close(m.groups()[3*i:3*i+3], d, nd=2) and d['mean'] > 0
    m = re.search(r'ECE: ' + IV + ', ' + IV + ' and ' + IV + ' points', md)
    ds = [diff(R, 'cskd', 'ce', n, 8, 'test_ece', col_b='ts_ece') for n in (20, 50, 200)]
    for i, d in enumerate(ds): assert close(m.groups()[3*i:3*i+3], d) and d['mean'] > 0
    assert 'clearly so only at 200 images per class' in md
    assert [d['lo'] > 0 for d in ds] == [False, False, True]
