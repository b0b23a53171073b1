"""The documentation site: `tools/build_docs` builds it from the notebooks (.ci/run has just built it, so
here the build is incremental and takes seconds), and the pages hold what a reader comes for."""
import json, os, re, subprocess, sys
from importlib import import_module
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow    # the slow tier (builds the documentation site): `pytest --all` runs it

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT/'_docs'
API_PAGES = {'data': 'Class-wise pairing', 'datasets': 'Datasets', 'partners': 'Partner sources',
             'callback': 'The CS-KD callback', 'metrics': 'Calibration metrics',
             'interpret': 'Calibration interpretation', 'calibrate': 'Calibrate a learner',
             'compare': 'Comparing CS-KD with its baseline'}


@pytest.fixture(scope='module')
def site():
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs')], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return SITE


def html(site, page): return (site/f'{page}.html').read_text(encoding='utf-8')

def text(h):
    "The visible text of a page, roughly: tags dropped, entities of <, >, & decoded"
    h = re.sub(r'<(script|style)\b.*?</\1>', ' ', h, flags=re.S)
    return re.sub(r'<[^>]+>', '', h).replace('&lt;', '<').replace('&gt;', '>').replace('&amp;', '&')


def test_build_command_is_executable():
    assert os.access(ROOT/'tools'/'build_docs', os.X_OK)


def test_every_notebook_has_a_page(site):
    nbs = [p for p in (ROOT/'nbs').rglob('*.ipynb') if not any(s.startswith(('.', '_')) for s in p.relative_to(ROOT/'nbs').parts)]
    from nbdev.config import nbpath2html
    for nb in nbs: assert (site/nbpath2html(nb.relative_to(ROOT/'nbs'))).exists(), nb
    for page in ['index', *API_PAGES, 'search', 'genindex']: assert (site/f'{page}.html').exists(), page
    if (ROOT/'nbs'/'tutorials'/'cifar10_study.ipynb').exists():
        assert '<h1>CS-KD on CIFAR-10' in html(site, 'tutorials/cifar10_study')
    if (ROOT/'nbs'/'tutorials'/'regime_study.ipynb').exists():
        h = html(site, 'tutorials/regime_study')
        assert '<h1>CS-KD where cross-entropy overfits' in h
        assert len(re.findall(r'<img [^>]*src="[^"]+\.png"', h)) >= 1       # the sweep plot
    if (ROOT/'nbs'/'performance.ipynb').exists():
        assert '<h1>Performance' in html(site, 'performance')
    if (ROOT/'nbs'/'calibrate_guide.ipynb').exists():  # the guide, with its reliability diagrams and tables
        h = html(site, 'calibrate_guide')
        assert '<h1>Calibrate your model' in h and re.search(r'<img [^>]*src="[^"]+\.png"', h) and h.count('<table') >= 2
    if (ROOT/'nbs'/'works_with.ipynb').exists():      # the compatibility matrix's tables, from the saved outputs
        h = html(site, 'works_with')
        assert '<h1>Works with' in h and h.count('<table') >= 3 and 'ImageDataLoaders.from_df' in text(h)


def test_front_page(site):
    h = html(site, 'index'); t = text(h)
    assert '<h1>cskd_fastai' in h
    for s in ['Install', 'pip install', 'Ten lines', 'learn.fit_one_cycle(3, 3e-3)', 'kd_loss']: assert s in t, s
    assert re.search(r'<img [^>]*src="_images/[^"]+\.png"', h), 'the front page shows its plot'
    for page, title in API_PAGES.items():      # the navigation
        assert re.search(rf'<a class="reference internal" href="{page}.html">{re.escape(title)}</a>', h), page
    if (ROOT/'nbs'/'performance.ipynb').exists():   # a page that documents no module is a guide, not an API page
        nav = re.sub(r'\s+', ' ', text(h))
        assert re.search(r'Guides[^A-Z]*(\w+ )*Performance', nav) and nav.index('Guides') > nav.index('API')


def _public_names(mod):
    "Public top-level names nbdev's _modidx lists for module `mod`: each gets a show_doc on its page"
    syms = import_module('cskd_fastai._modidx').d['syms'][f'cskd_fastai.{mod}']
    return sorted({k.split('.', 2)[2] for k in syms} - {n for n in (k.split('.', 2)[2] for k in syms) if '.' in n or n[0] == '_'})


@pytest.mark.parametrize('page', list(API_PAGES))
def test_api_pages_document_every_public_name(site, page):
    h = html(site, page)
    names = _public_names(page)
    assert names
    for nm in names:
        # nbdev's anchor (what _modidx.py links to), then the heading
        assert re.search(rf'<div class="sd-anchor" id="{re.escape(nm.lower())}(-\d)?">', h), nm
        assert re.search(rf'<h3>{re.escape(nm)}<a class="headerlink"', h), nm


def test_show_doc_signature_and_parameter_table(site):
    h = html(site, 'callback'); t = text(h)
    sec = t[t.index('CSKD¶'):]
    flat = re.sub(r'\s+', ' ', sec).replace('( ', '(')
    for s in ["CSKD(lam:float | callable=1.0, T:float=4.0, partner='forward', cache_mb:float | None=None"]: assert s in flat, flat[:400]
    assert 'Class-wise self-knowledge distillation (Yun et al., CVPR 2020)' in sec
    assert re.search(r'<th class="head"><p><strong>Details</strong></p></th>', h)
    for s in ['Weight λ of the KD term', 'Softmax temperature (> 0)', "(load partners and run them through the model: the paper)"]: assert s in sec, s
    assert 'github.com/cskd-fastai/cskd_fastai/blob/main/cskd_fastai/callback.py#L' in h     # [source]
    h = html(site, 'data')                                    # a patched method keeps its class in the name
    assert '<h3>DataBlock.paired_dataloaders<a class="headerlink"' in h


def test_nbdev_directives_and_hidden_cells_not_shown(site):
    for page in ['index', *API_PAGES]:
        t = text(html(site, page))
        assert '#|' not in t, page
        assert 'show_doc(' not in t, page              # show_doc cells show their output only
    assert 'NO_BAR' not in text(html(site, 'index'))              # a `#| hide` cell
    assert '_single_label_msg' not in text(html(site, 'data'))    # an `#| export` cell
    assert 'from nbdev.showdoc import show_doc' not in text(html(site, 'interpret'))


def test_plots_are_images(site):
    h = html(site, 'interpret')
    imgs = re.findall(r'<img [^>]*src="(_images/[^"]+\.png)"', h)
    assert len(imgs) >= 4
    for src in imgs: assert (site/src).stat().st_size > 1000, src


def test_cross_links(site):
    h = html(site, 'index')
    assert 'href="callback.html#sd-cskd"' in h                # `CSKD` -> its show_doc on the callback page
    h = html(site, 'interpret')
    assert 'href="#sd-calibrationinterpretation"' in h        # on the same page
    assert 'href="https://docs.fast.ai/' in h                  # fastai's names -> fastai's docs
    h = html(site, 'data')
    assert not re.search(r'href="https://cskd-fastai\.readthedocs\.io', h)   # this site's links stay on this site


def test_search_and_offline(site):
    idx = (site/'searchindex.js').read_text(encoding='utf-8')
    for nm in ['PairedDL', 'CalibrationInterpretation', 'cskd_loss']: assert f'"{nm}"' in idx, nm
    for page in ['index', *API_PAGES]:
        h = html(site, page)
        assert not re.search(r'<(script|link)[^>]+(src|href)="(https?:)?//', h), page   # no CDN: reads offline
        if 'class="math' in h: assert 'src="_static/mathjax/tex-chtml.js' in h, page   # MathJax shipped with the site
    assert (site/'_static'/'mathjax'/'tex-chtml.js').exists()
