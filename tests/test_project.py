"Project hygiene that a new user relies on: the README matches the front-page notebook, the public API is importable"
import json, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_in_step_with_index_notebook():
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'make_readme.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_all_exports_public_api():
    ns = {}
    exec('from cskd_fastai.all import *', ns)
    for name in ['CSKD', 'cskd_loss', 'PairedDL', 'ClassIndex', 'paired_dls', 'split_pairs', 'digits_folder', 'image_folder',
                 'PartnerForward', 'PartnerCache', 'CalibrationInterpretation', 'ece', 'SchedLin',
                 'vision_learner', 'Learner', 'DataBlock']:
        assert name in ns, name
    assert hasattr(ns['DataBlock'], 'paired_dataloaders') and hasattr(ns['Datasets'], 'paired_dataloaders')


# --------------------------------------------------------------------------------------------------
# Release hygiene: the license the metadata declares, one version shown everywhere, the CI files

def _pyproject():
    "pyproject.toml as a dict (tomllib from Python 3.11; the `tomli` backport, or a few regexes, on 3.10)"
    text = (ROOT/'pyproject.toml').read_text()
    try: import tomllib
    except ImportError:
        try: import tomli as tomllib
        except ImportError: tomllib = None
    if tomllib: return tomllib.loads(text)
    import re
    lic = re.search(r'^license\s*=\s*"([^"]+)"', text, re.M).group(1)
    files = re.findall(r'"([^"]+)"', re.search(r'^license-files\s*=\s*\[([^\]]*)\]', text, re.M).group(1))
    attr = re.search(r'^version\s*=\s*\{\s*attr\s*=\s*"([^"]+)"', text, re.M).group(1)
    return {'project': {'license': lic, 'license-files': files, 'dynamic': ['version']},
            'tool': {'setuptools': {'dynamic': {'version': {'attr': attr}}}}}


def test_license_file_is_the_declared_apache_2():
    proj = _pyproject()['project']
    assert proj['license'] == 'Apache-2.0'
    assert proj['license-files'] == ['LICENSE']     # so the wheel (.dist-info/licenses/) and the sdist carry it
    text = (ROOT/'LICENSE').read_text()
    for s in ['Apache License', 'Version 2.0, January 2004', 'http://www.apache.org/licenses/',
              'TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION', 'END OF TERMS AND CONDITIONS',
              'Licensed under the Apache License, Version 2.0']:
        assert s in text, s


def test_version_in_one_place_read_by_metadata_nbdev_docs_and_changelog():
    import re, runpy, cskd_fastai
    v = cskd_fastai.__version__
    assert re.fullmatch(r'\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?', v), v
    pp = _pyproject()
    assert 'version' in pp['project']['dynamic'] and 'version' not in pp['project']
    assert pp['tool']['setuptools']['dynamic']['version'] == {'attr': 'cskd_fastai.__version__'}
    assert 'version' not in pp['tool'].get('nbdev', {})           # nbdev 3 reads it from __init__.py too
    from nbdev.config import get_config
    assert get_config().version == v
    conf = runpy.run_path(str(ROOT/'docs'/'conf.py'))            # the docs site's version and title
    assert conf['release'] == conf['version'] == v and v in conf['html_title']
    changelog = (ROOT/'CHANGELOG.md').read_text()
    assert re.search(rf'^## \[?{re.escape(v)}\]?(\s|$)', changelog, re.M), f'CHANGELOG.md has no "## {v}" section'


def _workflow(name):
    "A workflow file parsed with PyYAML if it is installed (it comes with the dev extra's dependencies), else its text"
    text = (ROOT/'.github'/'workflows'/name).read_text()
    try: import yaml
    except ImportError: return None, text
    return yaml.safe_load(text), text


def _run_lines(wf):
    return [s['run'] for job in wf['jobs'].values() for s in job['steps'] if 'run' in s]


def test_test_workflow_runs_ci_run():
    "GitHub's test workflow runs .ci/run itself on push and pull request, so it does what a local run does"
    wf, text = _workflow('test.yaml')
    if wf is None: return _text_checks(text, ['.ci/run', 'push', 'pull_request'])
    on = wf.get('on', wf.get(True))                              # YAML 1.1 reads a bare `on:` key as True
    assert 'push' in on and 'pull_request' in on
    assert any('.ci/run' in r for r in _run_lines(wf))
    ci = (ROOT/'.ci'/'run').read_text()
    assert '.ci/wheel_check' in ci and 'set -euo pipefail' in ci
    import os
    assert os.access(ROOT/'.ci'/'run', os.X_OK) and os.access(ROOT/'.ci'/'wheel_check', os.X_OK)


def test_deploy_workflow_builds_the_docs_as_ci_does():
    wf, text = _workflow('deploy.yaml')
    for s in ['tools/build_docs', 'actions/upload-pages-artifact', 'actions/deploy-pages', '.[docs]']: assert s in text, s
    if wf is not None: assert wf.get('on', wf.get(True))['push']['branches'] == ['main']


def test_torch_pins_agree():
    "The torch that .ci/run, .ci/wheel_check's default and the docs deployment install is the same"
    import re
    pins = lambda text: re.findall(r'torch==[\w.]+ torchvision==[\w.]+', text)
    found = {p: pins((ROOT/p).read_text()) for p in ['.ci/run', '.ci/wheel_check', '.github/workflows/deploy.yaml']}
    assert all(found.values()) and len({x for v in found.values() for x in v}) == 1, found


def _text_checks(text, needles):
    for s in needles: assert s in text, s


# --------------------------------------------------------------------------------------------------
# Only the library's world in what a user reads: no path outside the repository, no word of how the
# project is developed

_LEAKS = {
    'a path outside the repository': r'\.\./shared\b|\bshared/(data|gpu)\b|/work/|/tmp/team\b|site-packages/',
    'development notes': r'DEVELOPERS\.md|\bprepare\.sh\b|\.gpu-data\b|\bdevelopment (machine|brief|session)s?\b',
    '"lent"': r'\blent\b',
    '"brief" as a document': r'\bbriefs\b|\b(the|development|common|project|helper|your) brief\b'
                             r'(?!\s+(description|summary|overview|introduction|look|note|example|explanation))',
    '"session" of development': r'\bsessions?\b',
}
# "session" has legitimate uses: a pytest fixture's scope, a Python, Jupyter or shell session
_SESSION_OK = re.compile(r"""(['"]session['"]|\b(python|ipython|jupyter|interactive|notebook|terminal|shell|pytest|test|ssh|tmux|http|requests?)\s+sessions?\b)""", re.I)


def _user_facing_files():
    "Every file of the repository (tracked, or new and not ignored) that a user or contributor reads"
    out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split('\n')
    tops = ('README.md', 'CHANGELOG.md', 'MANIFEST.in', 'pyproject.toml', '.readthedocs.yaml', 'nbs/', 'cskd_fastai/',
            'tools/', 'benchmarks/', 'docs/', 'tests/', '.ci/', '.github/')
    skip = {'cskd_fastai/_modidx.py', 'tests/test_project.py'}     # generated; this file names the patterns
    binary = ('.png', '.jpg', '.npz', '.npy', '.pkl', '.pth', '.tgz', '.gz', '.zip', '.ico', '.woff', '.woff2')
    return [f for f in out if f.startswith(tops) and f not in skip and not f.endswith(binary) and (ROOT/f).is_file()]


def _readable_text(path):
    "A notebook's sources and text outputs (not its images); any other file as it is"
    text = (ROOT/path).read_text(encoding='utf-8', errors='replace')
    if not path.endswith('.ipynb'): return text
    parts = []
    for c in json.loads(text)['cells']:
        parts.append(''.join(c['source']))
        for o in c.get('outputs', []):
            parts.append(''.join(o.get('text', '')))
            for k, v in o.get('data', {}).items():
                if k.startswith('text/'): parts.append(''.join(v))
    return '\n'.join(parts)


def _leaks(text):
    "(pattern name, matched line) for each development leak in `text`"
    res = []
    for name, pat in _LEAKS.items():
        for m in re.finditer(pat, text, re.I):
            start, end = text.rfind('\n', 0, m.start()) + 1, text.find('\n', m.end())
            line = text[start:end if end >= 0 else len(text)]
            if name.startswith('"session"') and any(o.start() <= m.start() - start < o.end() for o in _SESSION_OK.finditer(line)):
                continue
            res.append((name, line.strip()[:160]))
    return res


def test_the_leak_patterns_catch_leaks_and_spare_ordinary_words():
    for s in ['python tools/x.py --data ../shared/data/cifar10-jpg.tgz', 'see DEVELOPERS.md', 'run prepare.sh first',
              'no GPU was lent to us', 'as the brief asks', 'in this session', 'the sessions that changed it',
              'on the development machine', 'PYTHONPATH=/work/main', '/usr/lib/python3/site-packages/torch/x.py:3: Warning']:
        assert _leaks(s), s
    for s in ["@pytest.fixture(scope='session')", 'in an interactive Python session', 'a brief description',
              'silent', 'excellent', 'shared weights', 'briefly', 'the shared/ folder of the model']:
        assert not _leaks(s), s


def test_nothing_a_user_reads_speaks_of_development():
    files = _user_facing_files()
    assert 'README.md' in files and any(f.startswith('nbs/') for f in files)
    hits = list(dict.fromkeys(f'{f}: {line}' for f in files for _, line in _leaks(_readable_text(f))))   # each line once
    assert not hits, 'development leaks:\n' + '\n'.join(hits)



# --------------------------------------------------------------------------------------------------
# The front page's study numbers, recomputed from the study's saved results (not from the notebook)

STUDY = ROOT/'nbs'/'tutorials'/'regime_study'


def _runs(method):
    "The 200-epoch, full-subset runs of `method`, one per seed, as saved by tools/regime_study.py"
    fs = sorted(STUDY.glob(f'{method}_s[0-9]_f100.json'))
    return [json.loads(f.read_text()) for f in fs]


def _pm(xs, nd):
    import statistics
    return f'{statistics.mean(xs):.{nd}f} ± {statistics.stdev(xs):.{nd}f}'


def _paired_interval(a, b):
    "95% Student-t interval of the mean of b - a over paired seeds (tests/reference.py's `paired`)"
    from reference import paired
    d = paired(b, a)
    return d['lo'], d['hi']


def _num(x, nd, plus=False):
    "As the front page writes a number: a typographic minus, and a + on positive interval ends when asked"
    s = f'{x:.{nd}f}'.replace('-', '−')
    return '+' + s if plus and x > 0 else s


def _mean(xs): return sum(xs)/len(xs)

def test_front_page_study_numbers_match_the_saved_results():
    "'When it helps', the regime study's bullet and the temperature bullet, recomputed from the saved runs"
    ce, cskd, ctl = _runs('ce'), _runs('cskd'), _runs('pass')
    assert len(ce) == len(cskd) == len(ctl) == 3 and [r['seed'] for r in ce] == [r['seed'] for r in cskd] == [r['seed'] for r in ctl]
    readme = ' '.join((ROOT/'README.md').read_text().split())            # line breaks as spaces
    col = lambda runs, k, scale=1: [r[k] * scale for r in runs]
    assert '(3 seeds each; the pages give the paired 95% intervals)' in readme
    gap = _mean([r['mean_conf'] - r['test_acc'] for r in ce]) * 100
    assert f'cross-entropy ended {gap:.0f} points overconfident' in readme
    ece_ce, ece_cskd, ece_ctl = col(ce, 'test_ece', 100), col(cskd, 'test_ece', 100), col(ctl, 'test_ece', 100)
    nll_ce, nll_cskd = col(ce, 'test_nll'), col(cskd, 'test_nll')
    assert f'lowered ECE from {_mean(ece_ce):.1f}% to {_mean(ece_cskd):.1f}% and NLL from {_mean(nll_ce):.2f} to {_mean(nll_cskd):.2f}, on every seed' in readme
    assert all(b < a for a, b in zip(ece_ce, ece_cskd)) and all(b < a for a, b in zip(nll_ce, nll_cskd))
    lo, hi = _paired_interval(ece_ce, ece_ctl)
    assert 'the partner pass alone changed little' in readme and lo < 0 < hi           # the control: no clear change
    lo, hi = _paired_interval(ece_ctl, ece_cskd)
    assert "That was the KD term's doing" in readme and hi < 0                          # CS-KD against the control: clear
    err_ce, err_cskd = col(ce, 'test_err', 100), col(cskd, 'test_err', 100)
    lo, hi = _paired_interval(err_ce, err_cskd)
    assert f'the error was no clear gain ({_mean(err_cskd):.1f}% against {_mean(err_ce):.1f}%)' in readme and lo < 0 < hi
    ts_ce, ts_cskd = col(ce, 'ts_ece', 100), col(cskd, 'ts_ece', 100)
    assert _mean(ts_ce) < _mean(ts_cskd)
    assert f'it took cross-entropy to ECE {_mean(ts_ce):.1f}%, better than CS-KD with its own ({_mean(ts_cskd):.1f}%)' in readme


def test_front_page_digits_numbers_match_the_saved_results():
    "The digits bullet, from the dropout study's runs at `compare`'s default recipe (30 images a class, 20 epochs)"
    d = ROOT/'nbs'/'tutorials'/'dropout_study'/'digits'
    run = lambda m, s: json.loads((d/f'n030_e020_{m}_s{s}.json').read_text())
    readme = ' '.join((ROOT/'README.md').read_text().split())
    m = lambda meth, k: _mean([run(meth, s)[k] for s in range(3)]) * 100
    under = m('cskd', 'test_acc') - m('cskd', 'mean_conf')
    assert under > 0 and f'`CSKD()` ended {under:.0f} points *under*confident, ECE {m("cskd", "test_ece"):.1f}%' in readme
    assert f"against cross-entropy's {m('ce', 'test_ece'):.1f}%" in readme
    assert f"gave ECE {m('cskd-nodrop', 'test_ece'):.1f}% and {m('cskd-nodrop', 'test_err'):.1f}% error against {m('ce', 'test_err'):.1f}%" in readme


def test_front_page_finetune_numbers_match_the_saved_results():
    "The fine-tuning bullet, recomputed from the fine-tuning and dropout studies' runs (CS-KD minus cross-entropy, paired seeds)"
    d = ROOT/'nbs'/'tutorials'/'finetune_study'
    run = lambda m, n, e, s: json.loads((d/f'{m}_n{n:03d}_e{e}_s{s}.json').read_text())
    readme = ' '.join((ROOT/'README.md').read_text().split())
    pairs = [(run('ce', n, e, s), run('cskd', n, e, s)) for n in (20, 50, 200) for e in (3, 8) for s in range(3)]
    assert sum(b['test_err'] > a['test_err'] for a, b in pairs) == len(pairs) == 18
    assert "higher than cross-entropy's in all 18 paired runs" in readme
    m = _mean([100*(run('cskd', 20, 8, s)['test_err'] - run('ce', 20, 8, s)['test_err']) for s in range(3)])
    assert f'(by {m:.1f} points with 20 images a class)' in readme and m > 0
    # "no setting tried kept it as low on average at every size": every CS-KD setting measured with fine_tune(8) on
    # this backbone is worse than cross-entropy on the mean at one size at least
    runs = [json.loads(f.read_text()) for f in list(d.glob('*_e8_s[0-9].json')) + list((d.parent/'dropout_study'/'finetune').glob('*_s[0-9].json'))]
    err = {}
    for r in runs: err.setdefault((r['method'].replace('cskd-drop', 'cskd'), r['n_per_class']), {})[r['seed']] = r['test_err']
    settings = {m for m, _ in err if m.startswith('cskd')}
    assert len(settings) >= 9
    for s in settings:
        means = [_mean([err[s, n][k] - err['ce', n][k] for k in err[s, n]]) for n in (20, 50, 200, 500) if (s, n) in err]
        assert max(means) > 0, s
    assert 'no setting tried kept it as low on average at every size' in readme


def test_benchmark_scripts_refuse_to_run_without_data():
    import os
    env = {k: v for k, v in os.environ.items() if k != 'CSKD_CIFAR10'}
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'overhead.py')], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and '--data' in r.stderr and 'CSKD_CIFAR10' in r.stderr, r.stderr
    r = subprocess.run(['bash', str(ROOT/'benchmarks'/'gpu.sh')], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and 'no CIFAR-10 path given' in r.stderr and 'usage:' in r.stderr, r.stderr
    r = subprocess.run(['bash', str(ROOT/'benchmarks'/'gpu.sh'), str(ROOT/'no-such-folder')], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and 'does not exist' in r.stderr, r.stderr


def test_default_run_figures_match_the_saved_runs():
    "The default run's figures quoted on the front page and the compare page are those of its saved results, by thread count"
    runs = {t: json.loads((ROOT/'nbs'/'tutorials'/'default_run'/f'threads-{t}'/'results.json').read_text()) for t in (1, 2)}
    meta = {t: json.loads((ROOT/'nbs'/'tutorials'/'default_run'/f'threads-{t}'/'run.json').read_text()) for t in (1, 2)}
    assert all(meta[t]['torch_threads'] == t and runs[t]['config']['epochs'] == 20 for t in (1, 2))
    ce = {t: next(100*r['top1_err'] for r in runs[t]['summary'] if r['method'] == 'ce') for t in (1, 2)}
    readme = ' '.join((ROOT/'README.md').read_text().split())
    assert f"cross-entropy's error on the default run: {ce[1]:.1f}% with one thread, {ce[2]:.1f}% with two" in readme
    cells = json.loads((ROOT/'nbs'/'06_compare.ipynb').read_text())['cells']
    page = ' '.join(' '.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown').split())
    assert f"gave cross-entropy {ce[1]:.1f}% top-1 error with one thread and {ce[2]:.1f}% with two" in page
    mins = {t: divmod(round(meta[t]['wall_s']), 60) for t in (1, 2)}
    assert f"({mins[2][0]} min {mins[2][1]} s with two threads, {mins[1][0]} min {mins[1][1]} s with one" in page
    assert max(meta[t]['wall_s'] for t in (1, 2)) < 300 and 'under 5 minutes on 2 CPU cores' in readme
    said = {t: (ROOT/'nbs'/'tutorials'/'default_run'/f'threads-{t}'/'report.txt').read_text() for t in (1, 2)}
    m = re.search(r'Bottom line: no: CS-KD raised ECE by ([\d.]+) points \(\+([\d.]+) to', said[1])
    assert m and float(m[2]) > 0 and f'CS-KD raised ECE by {float(m[1]):.1f} points, interval above zero' in page
    assert 'Bottom line: not on this evidence' in said[2]
