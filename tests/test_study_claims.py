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
    return ' '.join(' '.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown').split())

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


# -------------------------------------------------------------------------------------- the dropout study
DP = 'dropout_study.ipynb'
SIGN = {'raised': 1, 'fell': -1}

@pytest.fixture(scope='module')
def dp():
    R = {}
    for folder in ('digits', 'finetune', 'finetune_strong', 'text'):
        for (m, n, e, s), r in runs(f'dropout_study/{folder}').items(): R[folder, m.replace('cskd-drop', 'cskd'), n, s] = r
    return R, markdown(DP)

def dd(R, point, a, b, col, k=100, col_b=None):
    folder, n = point
    seeds = [s for s in range(3) if (folder, a, n, s) in R]
    assert len(seeds) == 3, (point, a)
    return paired([k*R[folder, a, n, s][col] for s in seeds], [k*R[folder, b, n, s][col_b or col] for s in seeds])

POINTS = [('digits', 30), ('digits', 10), ('finetune', 20), ('finetune', 50), ('finetune', 200), ('finetune_strong', 50), ('text', 50)]

def test_dropout_rule_outcome(dp):
    "Exactly one point has an interval of (without − with dropout) above zero: ECE on the digits with 10 a class"
    R, md = dp
    above = [(p, c) for p in POINTS for c, k in [('test_err', 100), ('test_nll', 1), ('test_ece', 100)]
             if dd(R, p, 'cskd-nodrop', 'cskd', c, k)['lo'] > 0]
    assert above == [(('digits', 10), 'test_ece')]
    assert 'At one point of seven an interval of (without − with dropout) lay above zero' in md
    m = re.search(r'removing the dropout (raised|lowered) CS-KD\'s ECE by ' + NUM + r' points \[' + NUM + ', ' + NUM + r'\]', md)
    d = dd(R, ('digits', 10), 'cskd-nodrop', 'cskd', 'test_ece')
    assert m and close(m.groups()[1:], d, nd=2) and sign_word(m[1], d['mean'])
    m = re.search(r'its interval against `CSKD\(\)`, ' + IV + r', (spans zero|excludes zero)', md)
    d = dd(R, ('digits', 10), 'cskd-nodrop-lam2', 'cskd', 'test_ece')
    assert m and close(m.groups()[:3], d, nd=2) and spans(m[4], d)
    assert '**The rule keeps today\'s default**' in md

def test_dropout_digits_default_recipe(dp):
    R, md = dp
    m = re.search(r'without dropout the error (fell|raised) by ' + NUM + r' points \[' + NUM + ', ' + NUM + r'\], the NLL by ' + NUM
                  + r' \[' + NUM + ', ' + NUM + r'\] and the ECE by ' + NUM + r' points \[' + NUM + ', ' + NUM + r'\]', md)
    assert m
    for i, (c, k) in enumerate([('test_err', 100), ('test_nll', 1), ('test_ece', 100)]):
        d = dd(R, ('digits', 30), 'cskd-nodrop', 'cskd', c, k)
        mag, lo, hi = (num(x) for x in m.groups()[1+3*i:4+3*i])
        assert (round(SIGN[m[1]]*mag, 2), round(lo, 2), round(hi, 2)) == (round(d['mean'], 2), round(d['lo'], 2), round(d['hi'], 2))

def test_dropout_finetune_answer(dp):
    "Every CS-KD setting's error is above cross-entropy's on the mean at every size measured; the closest one's figures"
    R, md = dp
    ft = {}
    for f in list((TUT/'finetune_study').glob('*_e8_s[0-9].json')) + list((TUT/'dropout_study'/'finetune').glob('*_s[0-9].json')):
        r = json.loads(f.read_text()); ft.setdefault((r['method'].replace('cskd-drop', 'cskd'), r['n_per_class']), {})[r['seed']] = r
    for (m, n), rs in ft.items():
        if not m.startswith('cskd') or n == 500: continue          # CS-KD settings (not the control or label smoothing)
        assert np.mean([rs[s]['test_err'] - ft['ce', n][s]['test_err'] for s in rs]) > 0, (m, n)
    assert "Every setting's error was higher than cross-entropy's on the mean at every size measured" in md
    m = re.search(r'dropout, stayed within noise of cross-entropy\'s error \(' + IV + ', ' + IV + ' and ' + IV, md)
    for i, n in enumerate((20, 50, 200)):
        d = paired([100*ft['cskd-nodrop-lam0.25', n][s]['test_err'] for s in range(3)], [100*ft['ce', n][s]['test_err'] for s in range(3)])
        assert close(m.groups()[3*i:3*i+3], d) and d['lo'] < 0 < d['hi']
    m = re.search(r'its ECE was ' + IV + ' and ' + IV + r' points above\s+cross-entropy \+ temperature', md)
    for i, n in enumerate((20, 50)):
        d = paired([100*ft['cskd-nodrop-lam0.25', n][s]['test_ece'] for s in range(3)], [100*ft['ce', n][s]['ts_ece'] for s in range(3)])
        assert close(m.groups()[3*i:3*i+3], d) and d['lo'] > 0


def test_callback_page_dropout_section(dp):
    "The callback page's summary of the dropout study: each figure recomputed from the study's saved runs"
    R, _ = dp
    cells = json.loads((ROOT/'nbs'/'03_callback.ipynb').read_text())['cells']
    md = next(' '.join(''.join(c['source']).split()) for c in cells
              if c['cell_type'] == 'markdown' and ''.join(c['source']).startswith('### Dropout in the partner pass'))
    mean = lambda point, m, col, k=100: float(np.mean([k*R[point[0], m, point[1], s][col] for s in range(3)]))
    gap = lambda point, m: float(np.mean([100*(R[point[0], m, point[1], s]['mean_conf'] - R[point[0], m, point[1], s]['test_acc'])
                                          for s in range(3)]))
    d10, d30 = ('digits', 10), ('digits', 30)
    m = re.search(r'cross-entropy ended (\d+) points overconfident, `CSKD\(\)` reached ECE ' + NUM + r'% and the pass without '
                  r'dropout ' + NUM + r'% \(' + NUM + r' points \[' + NUM + ', ' + NUM + r'\]\)', md)
    assert m and int(m[1]) == round(gap(d10, 'ce')) and gap(d10, 'ce') > 0
    assert (num(m[2]), num(m[3])) == (round(mean(d10, 'cskd', 'test_ece'), 1), round(mean(d10, 'cskd-nodrop', 'test_ece'), 1))
    assert close(m.groups()[3:6], dd(R, d10, 'cskd-nodrop', 'cskd', 'test_ece'))
    m = re.search(r'λ = 2 without dropout did not recover it \(ECE ' + NUM + r'%\)', md)
    assert m and num(m[1]) == round(mean(d10, 'cskd-nodrop-lam2', 'test_ece'), 1)
    m = re.search(r"`CSKD\(\)`'s (\d+) points of underconfidence went away \(ECE " + NUM + '% → ' + NUM + '%, error ' + NUM + '% → '
                  + NUM + r'%\)', md)
    assert m and int(m[1]) == round(-gap(d30, 'cskd')) and gap(d30, 'cskd') < 0
    assert [num(x) for x in m.groups()[1:]] == [round(mean(d30, m_, c), 1) for c in ('test_ece', 'test_err') for m_ in ('cskd', 'cskd-nodrop')]
    m = re.search(r'with 20 images a class its error cost fell from ' + NUM + ' to ' + NUM + ' points', md)
    cost = lambda meth: dd(R, ('finetune', 20), meth, 'ce', 'test_err')['mean']
    assert m and (num(m[1]), num(m[2])) == (round(cost('cskd'), 1), round(cost('cskd-nodrop'), 1))
