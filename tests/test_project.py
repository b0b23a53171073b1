"Project hygiene that a new user relies on: the README matches the front-page notebook, the public API is importable"
import subprocess, sys
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
