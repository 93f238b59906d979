"""tools/demo_summary.py on fabricated demo work dirs, tools/run_demo.sh with a stand-in interpreter
(stage skipping, logs, summary, failure), and `make clean` removing only what the demo made."""
import importlib.util
import json
import os
import os.path as osp
import re
import subprocess
import sys
import textwrap

from helpers import ROOT

spec = importlib.util.spec_from_file_location('demo_summary', osp.join(ROOT, 'tools', 'demo_summary.py'))
demo_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_summary)

FOLD_REPORT = ('backbone.layer1.0.conv1  64x64x3x3  1:16  93.75%  1\n'
               '21 layers, 19 compressed; overall weight sparsity 88.10%\n')
DEPLOY_SUMMARY = dict(
    onnx_layers_verified=19, onnx_layers_missing=[],
    metrics=dict(stock_mmdet={'coco/bbox_mAP': 0.270, 'coco/segm_mAP': 0.282},
                 exported_graph={'coco/bbox_mAP': 0.261, 'coco/segm_mAP': 0.277},
                 onnx_runtime={'coco/bbox_mAP': 0.261, 'coco/segm_mAP': 0.277}),
    metric_deltas_points=dict(
        onnx_runtime_vs_exported_graph={'coco/bbox_mAP': 0.0, 'coco/segm_mAP': 0.0},
        exported_graph_vs_stock_mmdet={'coco/bbox_mAP': -0.9, 'coco/segm_mAP': -0.5}))


def write(path, text):
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)


def scalars(run_dir, *records):
    write(osp.join(run_dir, 'vis_data', 'scalars.json'), ''.join(json.dumps(r) + '\n' for r in records))


def test_training_maps_newest_run_last_record(tmp_path):
    work = str(tmp_path / 'dense')
    scalars(osp.join(work, '20260101_090000'), {'loss': 1.0, 'step': 10},
            {'coco/bbox_mAP': 0.5, 'coco/segm_mAP': 0.4, 'step': 800})
    scalars(osp.join(work, '20260102_090000'), {'loss': 2.0, 'step': 10},
            {'coco/bbox_mAP': 0.1, 'coco/bbox_mAP_50': 0.3, 'coco/segm_mAP': 0.2, 'step': 400},
            {'coco/bbox_mAP': 0.323, 'coco/segm_mAP': 0.312, 'step': 800}, {'loss': 0.5, 'step': 810})
    scalars(osp.join(work, '20260103_090000'), {'loss': 2.0, 'step': 10})  # newest: killed, no val
    write(osp.join(work, '20260104_090000', 'vis_data', 'scalars.json'), '{"coco/bbox_mAP": 0.9,')
    os.makedirs(osp.join(work, 'not_a_run'))
    maps = demo_summary.training_maps(work)
    assert maps == {'coco/bbox_mAP': 0.323, 'coco/segm_mAP': 0.312}


def test_training_maps_from_text_log(tmp_path):
    run = tmp_path / 'maxq' / '20260101_090000'
    write(str(run / '20260101_090000.log'), textwrap.dedent('''\
        2026/01/01 09:10:00 - mmengine - INFO - Iter(train) [150/150]  loss: 1.2
        2026/01/01 09:11:00 - mmengine - INFO - Iter(val) [15/15]    coco/bbox_mAP: 0.3140  coco/bbox_mAP_50: 0.5500  coco/segm_mAP: 0.3080  data_time: 0.01
        '''))  # noqa: E501  (a real log line)
    assert demo_summary.training_maps(str(tmp_path / 'maxq')) == {
        'coco/bbox_mAP': 0.314, 'coco/segm_mAP': 0.308}
    assert demo_summary.training_maps(str(tmp_path / 'missing')) is None


def test_format_seconds():
    assert [demo_summary.format_seconds(s) for s in (4.4, 838, 3720)] == [
        '4 s', '13 min 58 s', '1 h 02 min']


def stage_rows(text):
    """``{stage title: its status/result lines joined}`` of a printed summary."""
    lines = text[text.index('=== demo summary'):].splitlines()[1:]
    rows, title = {}, None
    for line in lines:
        if line.startswith('    '):
            rows[title] += line + '\n'
        elif not line.startswith('FAILED at'):
            title = line
            rows[title] = ''
    return rows


def fabricated_work(tmp_path, stages):
    work = str(tmp_path / 'demo')
    scalars(osp.join(work, 'dense', '20260101_090000'),
            {'coco/bbox_mAP': 0.323, 'coco/segm_mAP': 0.312, 'step': 800})
    scalars(osp.join(work, 'maxq', '20260101_100000'),
            {'coco/bbox_mAP': 0.314, 'coco/segm_mAP': 0.308, 'step': 150})
    write(osp.join(work, 'logs', 'fold.log'), FOLD_REPORT + 'folded checkpoint: x.pth\n')
    write(osp.join(work, 'logs', 'verify.log'), FOLD_REPORT + 'OK: x.pth satisfies its patterns\n')
    write(osp.join(work, 'onnx', 'deploy_summary.json'), json.dumps(DEPLOY_SUMMARY))
    write(osp.join(work, 'stages.tsv'), ''.join(f'{k}\t{s}\t{t}\t{title}\n' for k, s, t, title in stages))
    return work


ALL_OK = [('dense', 'skipped', 0, '1/5 dense'), ('maxq', 'ok', 838, '2/5 maxq'),
          ('fold', 'ok', 12, '3/5 fold'), ('verify', 'ok', 5, '4/5 verify'),
          ('onnx', 'ok', 190, '5/5 onnx')]


def test_summary_every_stage(tmp_path):
    work = fabricated_work(tmp_path, ALL_OK)
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'demo_summary.py'), work],
                          capture_output=True, text=True, check=True)
    row = stage_rows(proc.stdout)
    assert list(row) == [title for *_, title in ALL_OK]
    assert 'skipped (output exists)' in row['1/5 dense']
    assert 'bbox mAP 0.323, segm mAP 0.312' in row['1/5 dense']
    assert 'ok, 13 min 58 s' in row['2/5 maxq'] and 'bbox mAP 0.314, segm mAP 0.308' in row['2/5 maxq']
    assert '19 of 21 layers compressed, weight sparsity 88.10%' in row['3/5 fold']
    assert '19 layers verified (of 21)' in row['4/5 verify']
    onnx = row['5/5 onnx']
    assert 'ok, 3 min 10 s' in onnx and '19 layers verified in the ONNX graph' in onnx
    assert 'ONNX Runtime bbox mAP 0.261, segm mAP 0.277' in onnx
    assert 'ONNX Runtime - exported graph in PyTorch: bbox +0.00, segm +0.00 points' in onnx
    assert 'exported graph - stock mmdet (mmdeploy vs mmdet): bbox -0.90, segm -0.50 points' in onnx
    assert 'FAILED' not in proc.stdout


def test_summary_failed_stage(tmp_path):
    work = fabricated_work(tmp_path, ALL_OK[:2] + [('fold', 'failed:3', 7, '3/5 fold')])
    write(osp.join(work, 'logs', 'fold.log'), 'Traceback ...\nrefused to fold x.pth: boom\n\n')
    text = demo_summary.summary(work)
    row = stage_rows(text)
    assert list(row) == ['1/5 dense', '2/5 maxq', '3/5 fold']
    assert 'FAILED (exit 3), 7 s' in row['3/5 fold']
    assert osp.join(work, 'logs', 'fold.log') in row['3/5 fold']
    assert 'last line: refused to fold x.pth: boom' in row['3/5 fold']
    assert 'bbox mAP 0.314' in row['2/5 maxq']
    assert text.splitlines()[-1].startswith('FAILED at stage 3/5 fold (exit status 3)')


FAKE_PY = '''#!{python}
"""Stand-in interpreter for tools/run_demo.sh: fakes the tools, runs demo_summary.py for real."""
import json, os, sys
tool, args = sys.argv[1], sys.argv[2:]
with open(os.environ['CALLS'], 'a') as f:
    f.write(' '.join(sys.argv[1:]) + '\\n')
if tool == 'tools/demo_summary.py':
    os.execv({python!r}, [{python!r}, *sys.argv[1:]])
if tool == os.environ.get('FAIL_TOOL'):
    print('refused: boom', file=sys.stderr)
    sys.exit(3)
if tool == 'tools/train.py':
    work = args[args.index('--work-dir') + 1]
    os.makedirs(work + '/20260101_090000/vis_data')
    with open(work + '/20260101_090000/vis_data/scalars.json', 'w') as f:
        f.write(json.dumps({{'coco/bbox_mAP': 0.2, 'coco/segm_mAP': 0.1, 'step': 150}}) + '\\n')
    open(work + '/iter_150.pth', 'w').close()
elif tool == 'tools/fold.py':
    print({report!r})
elif tool == 'tools/deploy.py':
    work = args[args.index('--work-dir') + 1]
    os.makedirs(work)
    with open(work + '/deploy_summary.json', 'w') as f:
        json.dump({summary!r}, f)
'''


def run_demo(tmp_path, fail_tool=''):
    work = tmp_path / 'demo'
    fake = tmp_path / 'python'
    fake.write_text(FAKE_PY.format(python=sys.executable, report=FOLD_REPORT, summary=DEPLOY_SUMMARY))
    fake.chmod(0o755)
    os.makedirs(work / 'dense')
    (work / 'dense' / 'iter_800.pth').touch()  # stage 1 done before: skipped
    env = dict(os.environ, MMSPARSE_DEMO_PY=str(fake), MMSPARSE_DEMO_DIR=str(work),
               CALLS=str(tmp_path / 'calls'), FAIL_TOOL=fail_tool)
    proc = subprocess.run(['bash', osp.join(ROOT, 'tools', 'run_demo.sh')], env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, work, (tmp_path / 'calls').read_text().splitlines()


def test_run_demo_summary_of_all_stages(tmp_path):
    proc, work, calls = run_demo(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c.split()[0] for c in calls] == ['tools/train.py', 'tools/fold.py', 'tools/fold.py',
                                             'tools/deploy.py', 'tools/demo_summary.py']
    assert f'load_from={work}/dense/iter_800.pth' in calls[0]  # stage 2 fine-tunes stage 1's output
    row = list(stage_rows(proc.stdout).values())
    assert len(row) == 5
    assert 'skipped (output exists)' in row[0] and 'no COCO mAP found' in row[0]
    # the stub stage's wall time depends on the machine's load: any whole number of seconds
    assert re.search(r'ok, \d+ s ', row[1]) and 'bbox mAP 0.200, segm mAP 0.100' in row[1]
    assert '19 layers verified (of 21)' in row[3]
    assert 'ONNX Runtime - exported graph in PyTorch: bbox +0.00' in row[4]
    assert 'layers, 19 compressed' in (work / 'logs' / 'verify.log').read_text()


def test_run_demo_failed_stage_exits_with_its_status(tmp_path):
    proc, work, calls = run_demo(tmp_path, fail_tool='tools/deploy.py')
    assert proc.returncode == 3
    assert calls[-1].startswith('tools/demo_summary.py')
    row = list(stage_rows(proc.stdout).values())
    assert len(row) == 5 and '19 of 21 layers compressed' in row[2]
    assert 'FAILED (exit 3)' in row[4]
    assert 'last line: refused: boom' in row[4]  # the stage's stderr went to its log
    assert 'refused: boom' in (work / 'logs' / 'onnx.log').read_text()
    assert proc.stdout.splitlines()[-1].startswith('FAILED at stage 5/5 ONNX Runtime')


def test_make_clean_removes_only_demo_outputs():
    env = {k: v for k, v in os.environ.items() if k not in ('MAKEFLAGS', 'MAKELEVEL', 'MFLAGS')}
    proc = subprocess.run(['make', '-n', '--no-print-directory', 'clean'], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    commands = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    assert commands == [['rm', '-rf', 'work_dirs/demo', 'data/demo_coco']]

