"""The studies' figures that `compare`'s report quotes (cskd_fastai/evidence.json): the file is what tools/make_evidence.py
recomputes from the saved runs, each row is recomputed here again with code of its own, every measured setting is a row,
and the numbers the report prints are the file's"""
import importlib.util, json, re, sys
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from reference import ref_ece, paired

ROOT = Path(__file__).resolve().parents[1]
TUT = ROOT/'nbs'/'tutorials'
FILE = ROOT/'cskd_fastai'/'evidence.json'


def _tool():
    spec = importlib.util.spec_from_file_location('make_evidence', ROOT/'tools'/'make_evidence.py')
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

EV = json.loads(FILE.read_text(encoding='utf-8'))


def test_the_file_is_what_the_saved_runs_give():
    "Rerun `python tools/make_evidence.py` (and commit the file) when this fails after new study runs"
    tool = _tool()
    assert FILE.read_text(encoding='utf-8') == tool.dumps(tool.build())


def test_the_package_reads_the_file():
    from cskd_fastai.compare_report import evidence
    assert evidence() == EV and EV['runs'] and EV['lam_sweeps']


# ------------------------------------------------------------------------------- each row again, with code of its own
def _figures(ref):
    "(method, seed, error %, NLL, ECE %, confidence minus accuracy %) of a run: a per-run JSON, or 'predictions.npz:method/seed'"
    if ':' in ref:
        f, key = ref.split(':')
        m, s = key.split('/')
        with np.load(ROOT/f) as z: P, y = z[f'{key}/probs'].astype(np.float64), z[f'{key}/targs'].astype(int)
        acc = (P.argmax(1) == y).mean()
        return m, int(s), 100*(1 - acc), -np.log(P[np.arange(len(y)), y]).mean(), 100*ref_ece(P, y, 15), 100*(P.max(1).mean() - acc)
    r = json.loads((ROOT/ref).read_text())
    return r['method'], r['seed'], 100*r['test_err'], r['test_nll'], 100*r['test_ece'], 100*(r['mean_conf'] - (1 - r['test_err']))

def _interval(d):
    "Mean of the paired differences `d` and its 95% Student-t interval (the reference's `paired`)"
    r = paired(np.asarray(d, float), np.zeros(len(d)))
    return r['mean'], r['lo'], r['hi']

def _same(said, v, nd):
    return said is None if v is None else said == pytest.approx(round(float(v), nd), abs=1.01*10**-nd)   # rounding of a float sum

@pytest.mark.parametrize('row', EV['runs'], ids=[f"{r['study']}: {r['setting']}, {r['method']}" for r in EV['runs']])
def test_each_row_is_what_its_files_say(row):
    ce = [_figures(f) for f in row['files']['ce']]
    ck = [_figures(f) for f in row['files'][row['method']]]
    paper = FOLDERS.get(row['study'], (None, 'cskd'))[1] if row['method'] == 'cskd' else row['method']   # its name in the files
    assert [r[0] for r in ce] == ['ce']*len(ce) and [r[0] for r in ck] == [paper]*len(ck)
    assert [r[1] for r in ce] == [r[1] for r in ck] == row['seeds']                  # paired by seed
    assert _same(row['ce_gap'], np.mean([r[5] for r in ce]), 1) and _same(row['ce_ece'], np.mean([r[4] for r in ce]), 1)
    assert _same(row['ce_err'], np.mean([r[2] for r in ce]), 1)
    for k, i, nd in (('err', 2, 1), ('nll', 3, 3), ('ece', 4, 1)):
        m, lo, hi = _interval([b[i] - a[i] for a, b in zip(ce, ck)])
        assert _same(row[f'd_{k}'], m, nd) and _same(row[f'd_{k}_lo'], lo, nd) and _same(row[f'd_{k}_hi'], hi, nd), k
    for f in row['files']['ce'] + row['files'][row['method']]: assert (ROOT/f.split(':')[0]).exists(), f


# ------------------------------------------------------------------------------- every measured setting is a row
# folder -> the fields that name a setting, and the name of the paper's CS-KD in its files
FOLDERS = {'regime_study': (('frac',), 'cskd'), 'finetune_study': (('n_per_class', 'epochs'), 'cskd'),
           'digits_study': (('n_per_class', 'epochs'), 'cskd'), 'dropout_study/digits': (('n_per_class', 'epochs'), 'cskd'),
           'dropout_study/finetune': (('n_per_class', 'epochs'), 'cskd-drop'),
           'dropout_study/finetune_strong': (('n_per_class', 'epochs'), 'cskd-drop'),
           'dropout_study/text': (('n_per_class', 'epochs'), 'cskd-drop')}

@pytest.mark.parametrize('folder', [f for f in FOLDERS if (TUT/f).is_dir()])
def test_every_setting_with_both_methods_is_a_row(folder):
    "Each setting where cross-entropy and the paper's CS-KD share a seed is one row, whichever way CS-KD moved ECE"
    runs = [json.loads(f.read_text()) for f in sorted((TUT/folder).glob('*.json'))]
    runs = [r for r in runs if 'method' in r and 'test_ece' in r]
    keys, paper = FOLDERS[folder]
    seeds = lambda m, key: {r['seed'] for r in runs if r['method'] == m and tuple(r[k] for k in keys) == key}
    settings = {tuple(r[k] for k in keys) for r in runs}
    expect = sorted(sorted(seeds('ce', k) & seeds(paper, k)) for k in settings if seeds('ce', k) & seeds(paper, k))
    got = sorted(r['seeds'] for r in EV['runs'] if r['study'] == folder and r['method'] == 'cskd')
    assert got == expect

def test_the_compare_folder_study_is_a_row():
    d = TUT/'cifar10_study'
    if not (d/'predictions.npz').exists(): pytest.skip("no CIFAR-10 study results")
    keys = np.load(d/'predictions.npz').files
    seeds = lambda m: sorted(int(k.split('/')[1]) for k in keys if k.startswith(f'{m}/') and k.endswith('/probs'))
    rows = [r for r in EV['runs'] if r['study'] == 'cifar10_study' and r['method'] == 'cskd']
    assert [r['seeds'] for r in rows] == [sorted(set(seeds('ce')) & set(seeds('cskd')))]


def test_lambda_sweeps():
    "Each sweep: CS-KD's confidence minus accuracy per λ in one setting and seed, from its files; confidence falls as λ grows (the advice)"
    for sw in EV['lam_sweeps']:
        rs = [json.loads((ROOT/f).read_text()) for f in sw['files']]
        lam = lambda r: 1. if r['method'] == 'cskd' else float(r['method'].split('cskd-lam')[1])
        assert [[lam(r), round(100*(r['mean_conf'] - (1 - r['test_err'])), 1)] for r in rs] == sw['points']
        assert len({(r['epochs'], r['frac'], r['seed'], r['n_train']) for r in rs}) == 1 and rs[0]['seed'] == sw['seed']
        g = [p[1] for p in sorted(sw['points'])]
        assert g == sorted(g, reverse=True)


# ------------------------------------------------------------------------------- the printed numbers are the file's
def _fake(conf_gap, top1_err=(.10, .09), pretrained=False):
    "A `CompareResult` of made-up figures for cross-entropy and CS-KD, 3 seeds, 10 balanced classes"
    from cskd_fastai.compare import CompareResult, _summarise
    runs = pd.DataFrame(dict(method=['ce', 'cskd']*3, seed=[0, 0, 1, 1, 2, 2], top1_err=list(top1_err)*3, nll=[.3, .3]*3,
                             ece=[.05, .04, .06, .04, .05, .03], conf_gap=list(conf_gap)*3))
    y = np.arange(100) % 10
    preds = {f'{m}/{s}/{k}': v for m in ('ce', 'cskd') for s in range(3) for k, v in (('probs', np.full((100, 10), .1)), ('targs', y))}
    cfg = dict(data='x', split='valid', n_train=10, n_heldout=100, arch='resnet10t', pretrained=pretrained, epochs=1, lr=1e-3,
               T=4., lam=1., seeds=[0, 1, 2], n_bins=15)
    return CompareResult(_summarise(runs, ['ce', 'cskd']), runs, preds, {}, {}, {}, cfg)

def _numbers(text): return re.findall(r'[+-]\d+\.\d', text)

def test_the_closest_measured_run_is_quoted_as_the_file_has_it():
    from cskd_fastai.compare_report import bottom_line
    pool = [r for r in EV['runs'] if r['method'] == 'cskd' and not r['pretrained']]
    for target in pool:
        text = ' '.join(bottom_line(_fake((target['ce_gap']/100, 0.))).split())
        near = min(pool, key=lambda r: abs(r['ce_gap'] - target['ce_gap']))
        assert near['setting'] in text and near['title'] in text
        nums = _numbers(text.split('Next:')[1])
        assert nums[1:3] == [f"{near['ce_gap']:+.1f}", f"{near['d_ece']:+.1f}"], (nums, near)

def test_from_pretrained_weights_the_fine_tuning_answer_counts_the_files_runs():
    "From pretrained weights the bottom line gives the fine-tuning answer: how many CS-KD settings had a higher error, from the file"
    from cskd_fastai.compare_report import bottom_line
    ft = [r for r in EV['runs'] if r['pretrained'] and r['method'].startswith('cskd') and len(r['seeds']) > 1]
    worse = sum(r['d_err'] > 0 for r in ft)
    for gap in (-.09, 0., .2):
        text = ' '.join(bottom_line(_fake((gap, gap), pretrained=True)).split())
        nxt = text.split('Next:')[1]
        said = f"every CS-KD setting measured ({len(ft)} settings" if worse == len(ft) else f"{worse} of the {len(ft)} CS-KD settings"
        assert said in nxt and 'higher top-1 error' in nxt and "'+ts' row" in nxt and 'λ' not in nxt

def test_underconfident_cskd_is_pointed_to_the_pass_without_dropout_with_the_files_figures():
    from cskd_fastai.compare_report import bottom_line
    rows = {r['method']: r for r in EV['runs'] if r['study'] == 'dropout_study/digits' and r['setting'].startswith('digits, 30 ')}
    text = ' '.join(bottom_line(_fake((0., -.09))).split())
    nxt = text.split('Next:')[1]
    assert '`--methods ce cskd cskd-nodrop`' in nxt and rows['cskd']['setting'] in nxt
    assert rows['cskd']['d_ece'] > 0 > rows['cskd-nodrop']['d_ece']             # with dropout worse than CE, without better
    assert f"from {rows['cskd']['d_ece']:+.1f} to {rows['cskd-nodrop']['d_ece']:+.1f} points" in nxt
    assert 'smaller λ' in nxt
    assert 'cskd-nodrop' not in ' '.join(bottom_line(_fake((0., .09))).split())   # overconfident: λ only

def test_the_lambda_sweep_is_quoted_as_the_file_has_it():
    from cskd_fastai.compare_report import bottom_line
    sw = max(EV['lam_sweeps'], key=lambda s: len(s['points']))
    for gap in (-.09, .09):
        text = ' '.join(bottom_line(_fake((0., gap))).split())
        after = text.split('λ sweep')[1]
        assert sw['setting'] in after and sw['title'] in text
        assert _numbers(after.split('gave CS-KD')[1]) == [f"{p[1]:+.1f}" for p in sw['points']]
        assert ' / '.join(f"{p[0]:g}" for p in sw['points']) in after

def test_the_evidence_table_shows_the_file():
    from cskd_fastai.compare_report import evidence_table
    t = evidence_table()
    assert len(t) == len(EV['runs'])
    rows = sorted(EV['runs'], key=lambda r: r['ce_gap'])
    assert list(t['CE confidence - accuracy']) == [f"{r['ce_gap']:+.1f}" for r in rows]
    assert [s.split(' ')[0] for s in t['Δ ECE']] == [f"{r['d_ece']:+.1f}" for r in rows]
