"""Training-step cost of each method against the dense baseline, measured side by side.

All configs are built in one process and stepped interleaved (A B C A B C …) after warm-up, on one
fixed batch per config, through the real runner, hooks and optimizer wrappers. Reports the median
s/iter, the share spent in mmsparse hooks and gradient edits (mask / quantizer / gate work outside
the forward), and the peak memory of a separate process per config; all as ratios to the first
(dense) config. Writes JSON and a PNG bar chart.

    python tools/benchmark_train.py configs/demo/dense_mask-rcnn_r18_fpn_demo.py \
        configs/demo/maxq_mask-rcnn_r18_1-16_demo.py --iters 20 --out work_dirs/bench

The real R50 configs run on the embedded demo data at a chosen scale and batch (random init, no
checkpoint), e.g. ``configs/dense_mask-rcnn_r50_fpn_1x_coco.py configs/maxq_mask-rcnn_r50_1-16.py
--dataset-from configs/_base_/datasets/demo_coco_instance.py --scale 512 --batch-size 2``.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time
from typing import Dict, List

from mmengine.config import Config
from mmengine.runner import Runner

import mmsparse  # noqa: F401
from mmsparse.utils import write_json

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DATA_FLAGS = ('data-root', 'dataset-from', 'scale', 'batch-size')


def load_cfg(path: str, work_dir: str, data: argparse.Namespace) -> Config:
    """The config with no checkpoint loading, no validation and quiet logging; its training data
    replaced as ``data`` (``--data-root``, ``--dataset-from``, ``--scale``, ``--batch-size``) says."""
    cfg = Config.fromfile(path)
    cfg.load_from = None
    cfg.resume = False
    cfg.work_dir = work_dir
    # an iteration-based loop for every config (the R50 configs train by epoch)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=10**6, val_interval=10**6)
    cfg.default_hooks.logger.interval = 10**6
    cfg.default_hooks.checkpoint.interval = 10**6
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    if data.dataset_from:
        cfg.train_dataloader.dataset = Config.fromfile(data.dataset_from).train_dataloader.dataset
    if data.data_root:
        cfg.train_dataloader.dataset.data_root = data.data_root.rstrip('/') + '/'
    if data.batch_size:
        cfg.train_dataloader.batch_size = data.batch_size
    for step in cfg.train_dataloader.dataset.pipeline if data.scale else ():
        if step['type'] == 'Resize':
            step['scale'] = (data.scale, data.scale)
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator', 'test_dataloader', 'test_cfg',
                'test_evaluator'):
        cfg.pop(key, None)
    inner = cfg.model.get('model', cfg.model)
    if inner.get('backbone', {}).get('init_cfg'):
        inner.backbone.init_cfg = None
    return cfg


class Stepper:
    """A runner set up exactly as ``Runner.train`` does, stepped one iteration at a time."""

    def __init__(self, cfg: Config) -> None:
        runner = Runner.from_cfg(cfg)
        runner._train_loop = runner.build_train_loop(runner._train_loop)
        runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
        if runner.param_schedulers is not None:
            runner.param_schedulers = runner.build_param_scheduler(runner.param_schedulers)
        runner.call_hook('before_run')
        runner._init_model_weights()
        runner.load_or_resume()
        runner.call_hook('before_train')
        runner.call_hook('before_train_epoch')
        self.runner = runner
        self.batch = next(runner.train_loop.dataloader_iterator)
        self.overhead = 0.0
        self._instrument()

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.overhead += time.perf_counter() - start
        return wrapper

    def _instrument(self) -> None:
        """Time mmsparse's method hooks and gradient edits (the compression work outside forward)."""
        for hook in self.runner.hooks:
            if type(hook).__module__.startswith('mmsparse') and \
                    not type(hook).__module__.startswith(('mmsparse.compat', 'mmsparse.engine')):
                for stage in ('before_train_iter', 'after_train_iter'):
                    setattr(hook, stage, self._timed(getattr(hook, stage)))
        wrapper = self.runner.optim_wrapper
        for name in ('edit_gradients', 'after_step'):
            if hasattr(wrapper, name):
                setattr(wrapper, name, self._timed(getattr(wrapper, name)))

    def step(self) -> float:
        """One training iteration; returns its wall time."""
        self.runner.model.train()
        start = time.perf_counter()
        self.runner.train_loop.run_iter(self.batch)
        return time.perf_counter() - start


def peak_memory(path: str, data: argparse.Namespace, iters: int) -> Dict[str, float]:
    """Peak RSS of a fresh process that builds ``path`` and trains ``iters`` steps (MiB)."""
    args = [sys.executable, __file__, path, '--memory-child', '--iters', str(iters)]
    for flag in DATA_FLAGS:
        value = getattr(data, flag.replace('-', '_'))
        if value:
            args += [f'--{flag}', str(value)]
    out = subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _status_mib(field: str) -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def memory_child(path: str, data: argparse.Namespace, iters: int) -> None:
    """Peak RSS while training, minus the RSS before the first step (Linux ``VmHWM`` reset)."""
    import tempfile
    stepper = Stepper(load_cfg(path, tempfile.mkdtemp(), data))
    before = _status_mib('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')   # reset the peak-RSS counter (VmHWM) to the current RSS
    for _ in range(iters):
        stepper.step()
    peak = _status_mib('VmHWM')
    print(json.dumps(dict(peak_rss_mib=peak, train_delta_mib=peak - before)))


def plot(results: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = [r['name'] for r in results]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.5))
    ax.bar(names, [r['time_ratio'] for r in results], color='tab:blue')
    ax.axhline(1.0, color='k', lw=0.8)
    ax.set_ylabel('s/iter ÷ dense')
    ax.set_title('training step cost relative to dense (same run)')
    plt.xticks(rotation=20, ha='right', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('configs', nargs='+', help='configs; the first is the dense baseline')
    parser.add_argument('--iters', type=int, default=20, help='measured rounds')
    parser.add_argument('--warmup', type=int, default=3, help='warm-up rounds')
    parser.add_argument('--data-root', help='override the training data root')
    parser.add_argument('--dataset-from', help="take train_dataloader.dataset from this config "
                        "(e.g. the demo data's for the R50 configs)")
    parser.add_argument('--scale', type=int, help='train at SCALE x SCALE (every Resize step)')
    parser.add_argument('--batch-size', type=int, help='images per training batch')
    parser.add_argument('--out', default='work_dirs/benchmark_train', help='output directory')
    parser.add_argument('--no-memory', action='store_true', help='skip the memory subprocesses')
    parser.add_argument('--quick', action='store_true', help='2 warm-up + 3 rounds (smoke test)')
    parser.add_argument('--memory-child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.iters = 1, 2
    if args.memory_child:
        memory_child(args.configs[0], args, args.iters)
        return

    os.makedirs(args.out, exist_ok=True)
    steppers = [Stepper(load_cfg(p, osp.join(args.out, f'run{i}'), args))
                for i, p in enumerate(args.configs)]
    times: List[List[float]] = [[] for _ in steppers]
    for round_idx in range(args.warmup + args.iters):
        for idx, stepper in enumerate(steppers):
            if round_idx == args.warmup:
                stepper.overhead = 0.0
            elapsed = stepper.step()
            if round_idx >= args.warmup:
                times[idx].append(elapsed)

    results = []
    for path, stepper, ts in zip(args.configs, steppers, times):
        median = statistics.median(ts)
        results.append(dict(name=osp.splitext(osp.basename(path))[0], config=path,
                            s_per_iter=median, overhead_share=stepper.overhead / sum(ts)))
    for res in results:
        res['time_ratio'] = res['s_per_iter'] / results[0]['s_per_iter']
    if not args.no_memory:
        for res in results:
            res.update(peak_memory(res['config'], args, max(args.iters // 4, 2)))
        for res in results:
            res['memory_ratio'] = res['train_delta_mib'] / max(results[0]['train_delta_mib'], 1e-9)

    header = f'{"config":44s} {"s/iter":>8s} {"×dense":>7s} {"hook+edit":>9s}'
    if not args.no_memory:
        header += f' {"peak MiB":>9s} {"Δtrain MiB":>10s} {"×dense":>7s}'
    print(header)
    for r in results:
        line = (f'{r["name"][:44]:44s} {r["s_per_iter"]:8.3f} {r["time_ratio"]:7.2f} '
                f'{r["overhead_share"]:9.1%}')
        if not args.no_memory:
            line += f' {r["peak_rss_mib"]:9.0f} {r["train_delta_mib"]:10.0f} {r["memory_ratio"]:7.2f}'
        print(line)
    meta = dict(iters=args.iters, warmup=args.warmup, cpu_count=os.cpu_count(),
                data={flag: getattr(args, flag.replace('-', '_')) for flag in DATA_FLAGS},
                load_avg=os.getloadavg(), results=results)
    write_json(osp.join(args.out, 'benchmark_train.json'), meta)
    plot(results, osp.join(args.out, 'benchmark_train.png'))
    print(f'wrote {args.out}/benchmark_train.json and .png')


if __name__ == '__main__':
    main()
