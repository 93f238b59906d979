"""tools/benchmark_train.py --quick runs dense and MaxQ side by side and writes its report."""
import json

import pytest
from helpers import run_tool

pytestmark = pytest.mark.slow


def test_quick_benchmark(tiny_coco, tmp_path):
    run_tool('benchmark_train.py', [
        'configs/demo/dense_mask-rcnn_r18_fpn_demo.py', 'configs/demo/maxq_mask-rcnn_r18_1-16_demo.py',
        '--quick', '--data-root', tiny_coco, '--out', str(tmp_path)])
    report = json.loads((tmp_path / 'benchmark_train.json').read_text())
    names = [r['name'] for r in report['results']]
    assert names == ['dense_mask-rcnn_r18_fpn_demo', 'maxq_mask-rcnn_r18_1-16_demo']
    dense, maxq = report['results']
    assert dense['time_ratio'] == 1.0 and maxq['time_ratio'] > 0
    assert dense['overhead_share'] == 0.0 and maxq['overhead_share'] > 0   # mask work is timed
    assert maxq['peak_rss_mib'] > 0 and 'memory_ratio' in maxq
    assert (tmp_path / 'benchmark_train.png').stat().st_size > 0
