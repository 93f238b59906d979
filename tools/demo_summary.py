"""Closing summary of ``tools/run_demo.sh``: every stage run so far, its result and its wall time.

    python tools/demo_summary.py WORK_DIR

``run_demo.sh`` appends one line per stage to ``WORK_DIR/stages.tsv`` (key, status, seconds, title;
status ``ok``, ``skipped`` or ``failed:<exit status>``). The results are read from what the stages
left behind: the COCO mAPs of the training stages from mmengine's
``<work dir>/<timestamp>/vis_data/scalars.json`` (the text log ``<timestamp>.log`` when there is no
scalars file), the fold and verify reports from their logs (``WORK_DIR/logs/<key>.log``) and the ONNX
Runtime mAPs and deltas from ``WORK_DIR/onnx/deploy_summary.json``. Standard library only, so it
runs in a second even when a stage broke the environment.
"""
import argparse
import glob
import json
import os.path as osp
import re
import sys
from typing import Callable, Dict, List, Optional

RUN_DIR = re.compile(r'\d{8}_\d{6}')           # mmengine's timestamped run directory
LOG_METRIC = re.compile(r'(coco/\w+_mAP): (-?\d+(?:\.\d+)?)')
REPORT_TOTAL = re.compile(r'(\d+) layers, (\d+) compressed; overall weight sparsity ([\d.]+%)')


def _maps(metrics: Dict[str, float]) -> str:
    """``bbox mAP 0.323, segm mAP 0.312`` (headline ``*_mAP`` keys only)."""
    keys = sorted(k for k in metrics if k.endswith('_mAP'))
    return ', '.join(f'{k.split("/")[-1][:-len("_mAP")]} mAP {float(metrics[k]):.3f}' for k in keys)


def _deltas(deltas: Dict[str, float]) -> str:
    keys = sorted(k for k in deltas if k.endswith('_mAP'))
    return ', '.join(f'{k.split("/")[-1][:-len("_mAP")]} {float(deltas[k]):+.2f}' for k in keys)


def training_maps(work_dir: str) -> Optional[Dict[str, float]]:
    """The last validation mAPs of the newest mmengine run in ``work_dir`` that has any, or None.

    Runs are the timestamped directories mmengine creates per start (a resumed or repeated training
    adds one); within a run the last line carrying ``coco/*_mAP`` wins.
    """
    runs = sorted((d for d in glob.glob(osp.join(work_dir, '*')) if osp.isdir(d)
                   and RUN_DIR.fullmatch(osp.basename(d))), reverse=True)
    for run in runs:
        found: Optional[Dict[str, float]] = None
        scalars = osp.join(run, 'vis_data', 'scalars.json')
        if osp.isfile(scalars):
            with open(scalars) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line cut short by a killed run
                        continue
                    maps = {k: float(v) for k, v in record.items() if k.endswith('_mAP')}
                    if maps:
                        found = maps
        else:
            log = osp.join(run, osp.basename(run) + '.log')
            if osp.isfile(log):
                with open(log, errors='replace') as f:
                    for line in f:
                        maps = {k: float(v) for k, v in LOG_METRIC.findall(line)}
                        if maps:
                            found = maps
        if found:
            return found
    return None


def _training_result(work: str, sub: str) -> List[str]:
    maps = training_maps(osp.join(work, sub))
    return [_maps(maps)] if maps else [f'no COCO mAP found under {osp.join(work, sub)}']


def _report_total(work: str, key: str) -> Optional[re.Match]:
    log = osp.join(work, 'logs', f'{key}.log')
    if not osp.isfile(log):
        return None
    with open(log, errors='replace') as f:
        return next((m for m in (REPORT_TOTAL.search(line) for line in f) if m), None)


def _fold_result(work: str) -> List[str]:
    total = _report_total(work, 'fold')
    if total is None:
        return ['no fold report in logs/fold.log']
    layers, compressed, sparsity = total.groups()
    return [f'{compressed} of {layers} layers compressed, weight sparsity {sparsity}']


def _verify_result(work: str) -> List[str]:
    total = _report_total(work, 'verify')
    if total is None:
        return ['no verify report in logs/verify.log']
    return [f'{total.group(2)} layers verified (of {total.group(1)})']


def _deploy_result(work: str) -> List[str]:
    path = osp.join(work, 'onnx', 'deploy_summary.json')
    if not osp.isfile(path):
        return [f'no {path}']
    with open(path) as f:
        summary = json.load(f)
    lines = [f'{summary.get("onnx_layers_verified", "?")} layers verified in the ONNX graph, '
             f'{len(summary.get("onnx_layers_missing", []))} not found']
    metrics = summary.get('metrics', {})
    deltas = summary.get('metric_deltas_points', {})
    if 'onnx_runtime' in metrics:
        lines += [f'ONNX Runtime {_maps(metrics["onnx_runtime"])}',
                  'ONNX Runtime - exported graph in PyTorch: '
                  f'{_deltas(deltas["onnx_runtime_vs_exported_graph"])} points',
                  'exported graph - stock mmdet (mmdeploy vs mmdet): '
                  f'{_deltas(deltas["exported_graph_vs_stock_mmdet"])} points']
    return lines


RESULTS: Dict[str, Callable[[str], List[str]]] = {
    'dense': lambda work: _training_result(work, 'dense'),
    'maxq': lambda work: _training_result(work, 'maxq'),
    'fold': _fold_result,
    'verify': _verify_result,
    'onnx': _deploy_result,
}


def format_seconds(seconds: float) -> str:
    """``42 s``, ``13 min 58 s``, ``1 h 02 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f'{seconds} s'
    if seconds < 3600:
        return f'{seconds // 60} min {seconds % 60:02d} s'
    return f'{seconds // 3600} h {seconds // 60 % 60:02d} min'


def _last_line(path: str) -> str:
    if not osp.isfile(path):
        return ''
    with open(path, errors='replace') as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else ''


def summary(work: str) -> str:
    """The stages recorded in ``work/stages.tsv``: per stage its title, then status and wall time
    with the result (one or more lines); a last line names the failed stage, if any."""
    out = [f'=== demo summary ({work}) ===']
    failure = None
    with open(osp.join(work, 'stages.tsv')) as f:
        rows = [line.rstrip('\n').split('\t', 3) for line in f if line.strip()]
    for key, status, seconds, title in rows:
        time = format_seconds(float(seconds))
        if status == 'ok':
            status, result = f'ok, {time}', RESULTS[key](work)
        elif status == 'skipped':
            status, result = 'skipped (output exists)', RESULTS[key](work)
        else:  # failed:<exit status>
            code = status.partition(':')[2]
            log = osp.join(work, 'logs', f'{key}.log')
            status, result = f'FAILED (exit {code}), {time}', [f'log: {log}',
                                                               f'last line: {_last_line(log)}']
            failure = f'FAILED at stage {title} (exit status {code}); the stages after it did not run'
        out.append(title)
        out.append(f'    {status:<26}{result[0]}')
        out += [f'    {"":<26}{more}' for more in result[1:]]
    if failure:
        out.append(failure)
    return '\n'.join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='Summary of the demo stages (tools/run_demo.sh)')
    parser.add_argument('work_dir', help='the demo work dir holding stages.tsv')
    args = parser.parse_args(argv)
    print(summary(args.work_dir))
    return 0


if __name__ == '__main__':
    sys.exit(main())
