"""Sphinx configuration of the documentation site.

`tools/build_docs` runs nbdev's notebook processing (nbs/ -> _proc/), then Sphinx with this file on
_proc/ (`sphinx-build -c docs _proc _proc/.build/html`), and copies the site to _docs/. The notebooks
are not executed here: myst-nb renders the outputs saved in them."""
import importlib.util, os, re, shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

project = 'cskd_fastai'
author = 'cskd_fastai developers'
copyright = 'cskd_fastai developers, Apache-2.0'
release = version = re.search(r'__version__\s*=\s*"([^"]+)"', (ROOT/'cskd_fastai'/'__init__.py').read_text()).group(1)

extensions = ['myst_nb', 'sphinx_copybutton']
exclude_patterns = ['.stage', '.build', '**/.ipynb_checkpoints']   # tools/build_docs's own folders
root_doc = 'index'

# myst-nb: render the saved outputs, never execute
nb_execution_mode = 'off'
nb_merge_streams = True
myst_enable_extensions = ['dollarmath', 'amsmath', 'attrs_block', 'colon_fence']
myst_dmath_double_inline = True
suppress_warnings = ['myst.header',              # nbdev's show_doc headings are H3, also right under an H1
                     'misc.highlighting_failure']  # `!cmd \` continuation lines: shown as plain text

# HTML: the Furo theme (sidebar navigation, search, light/dark), plus a little CSS for show_doc
html_theme = 'furo'
html_title = f'cskd_fastai {release}'
html_static_path = ['_static']
html_css_files = ['custom.css']
html_copy_source = False
html_show_sourcelink = False
html_baseurl = os.environ.get('READTHEDOCS_CANONICAL_URL', '')
html_theme_options = {'navigation_with_keys': True}
copybutton_exclude = '.linenos, .gp, .go'

# MathJax from the package `sphinx-mathjax-offline` (a docs dependency) so that the maths renders
# without a network; without it, Sphinx's default (a CDN) is used.
_mj = importlib.util.find_spec('sphinx-mathjax-offline')
_mj = Path(_mj.submodule_search_locations[0])/'static'/'mathjax' if _mj else None
if _mj and (_mj/'tex-chtml.js').exists(): mathjax_path = 'mathjax/tex-chtml.js'
else: _mj = None

def _copy_mathjax(app, exc):
    "Copy the one MathJax bundle the pages load, its fonts and its TeX extensions (not the 24 MB package)"
    if exc is not None or _mj is None or app.builder.format != 'html': return
    dest = Path(app.outdir)/'_static'/'mathjax'
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_mj/'tex-chtml.js', dest/'tex-chtml.js')
    for sub in ('output/chtml/fonts/woff-v2', 'input/tex/extensions'):
        shutil.copytree(_mj/sub, dest/sub, dirs_exist_ok=True)

def setup(app): app.connect('build-finished', _copy_mathjax)
