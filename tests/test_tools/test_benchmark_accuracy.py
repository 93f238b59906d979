"""tools/benchmark_accuracy.py --quick: real digits data, Runner + each method's layers and hooks."""
import json
import math
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(ROOT, 'tools', 'benchmark_accuracy.py')

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench_acc')
    proc = subprocess.run([sys.executable, TOOL, '--quick', '--out', str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / 'results.json').read_text())
    return report, (out / 'results.md').read_text()


def test_quick_run_has_every_quick_method_with_finite_accuracy(quick_report):
    report, table = quick_report
    expected = {'dense', 'maxq-2:4', 'cgmq-16/1024'}
    try:
        import mmsparse.sapp  # noqa: F401
        expected.add('sapp-70')
    except ImportError:
        pass
    assert expected <= set(report['results'])
    assert report['seeds'] == [0]
    for name, res in report['results'].items():
        assert len(res['runs']) == 1, name
        assert math.isfinite(res['acc_mean']) and 0.0 <= res['acc_mean'] <= 1.0, name
        assert f'| {name} |' in table
    # 10 classes: chance is 0.1; a few dozen Adam steps on standardised digits reliably give > 0.3
    assert report['results']['dense']['acc_mean'] > 0.3
    assert report['pretrain_acc']['mean'] > 0.3


def test_quick_run_verifies_what_each_method_achieved(quick_report):
    report, _ = quick_report
    maxq = report['results']['maxq-2:4']['runs'][0]
    assert maxq['nm_pattern'] == '2:4' and maxq['nm_max_nnz'] <= 2 and maxq['nm_ok']
    assert maxq['nm_layers'] == ['conv2', 'conv3']
    cgmq = report['results']['cgmq-16/1024']['runs'][0]
    assert cgmq['bops_ok'] and cgmq['bops_rel'] <= 16 / 1024 + 1e-12
    if 'sapp-70' in report['results']:
        sapp = report['results']['sapp-70']['runs'][0]
        assert sapp['block_ok'] and sapp['block_sparsity_min'] >= 0.69
        assert set(sapp['block_sparsity']) == {'conv2', 'conv3'}
    assert all(res['verified'] in (True, None) for res in report['results'].values())


def test_unknown_method_is_an_error():
    proc = subprocess.run([sys.executable, TOOL, '--quick', '--methods', 'nope'], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and 'unknown or unavailable methods' in proc.stderr
