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
    for name in ['CSKD', 'cskd_loss', 'PairedDL', 'ClassIndex', 'paired_dls', 'split_pairs', 'digits_folder',
                 'vision_learner', 'Learner', 'DataBlock']:
        assert name in ns, name
    assert hasattr(ns['DataBlock'], 'paired_dataloaders') and hasattr(ns['Datasets'], 'paired_dataloaders')
