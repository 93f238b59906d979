"""Accuracy of every method on real data, cheap enough to repeat: a small CNN on sklearn ``digits``.

Real handwritten digits (8x8 grey, 1797 samples, shipped inside scikit-learn, no download), one fixed
stratified train/test split (1257/540). For every seed: a dense model is pretrained once through the
MMEngine ``Runner``; then every method fine-tunes from that checkpoint (``load_from``) for the same
number of iterations, through the ``Runner`` with the method's real registered layers (swapped in by
``ConvertedModel`` rules), hooks and optimizer wrappers, all built from config dicts. ``dense`` is the
same fine-tuning without compression, so every method sees the same total number of steps.

Network (``DigitsNet``): conv1 1->16 3x3 (stem, stays dense: 1 input channel) -> conv2 16->32 3x3
-> maxpool -> conv3 32->64 3x3 -> maxpool -> global average -> fc 64->10. N:M and block-sparse methods
compress conv2 and conv3 (input channels divisible by 16; the classifier stays dense, SPEC §1.6);
CGMQ quantizes all four layers (weights and input activations) from 8/8 bits.

After each run the test accuracy, and what was achieved, are measured on the final model:
N:M sparsity and the largest non-zero count of any block (``mmsparse.core.model_report``); CGMQ
BOPs relative to 32/32 and the per-layer bit widths; SA++/ACDC share of all-zero BxB blocks.

    python tools/benchmark_accuracy.py --out work_dirs/benchmark_accuracy      # full default run
    python tools/benchmark_accuracy.py --quick --out /tmp/bench_acc            # smoke test
"""
import argparse
import contextlib
import io
import math
import os
import os.path as osp
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import mmsparse  # noqa: F401  (registers layers, hooks, optimizer wrappers, ConvertedModel)
from mmsparse.cgmq import cgmq_layers, full_precision_bops, total_bops
from mmsparse.core import block_sparsity, model_report
from mmsparse.utils import atomic_write, write_json

try:  # SequentialAttention++ / ACDC (mmsparse.sapp) may be absent in older checkouts
    from mmsparse.sapp import BlockSparseMixin
except ImportError:  # pragma: no cover
    BlockSparseMixin = None


# -- data ---------------------------------------------------------------------------------------
def load_digits_split(test_size: float = 0.3, split_seed: int = 0):
    """Fixed stratified split of sklearn digits, standardised with the training mean and std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None]  # (N, 1, 8, 8), values 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y,
                                              random_state=split_seed)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    to_t = lambda a: torch.from_numpy((a - mean) / std)  # noqa: E731
    return to_t(x_tr), torch.from_numpy(y_tr), to_t(x_te), torch.from_numpy(y_te)


class TensorDictDataset(Dataset):
    """In-memory dataset yielding ``dict(inputs=..., labels=...)`` (the model's forward arguments)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: int) -> dict:
        return dict(inputs=self.x[idx], labels=self.y[idx])


# -- model --------------------------------------------------------------------------------------
@MODELS.register_module(force=True)
class DigitsNet(BaseModel):
    """Small CNN for 8x8 digits; ``forward(inputs, labels, mode)`` in MMEngine's convention."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, inputs, labels=None, mode: str = 'tensor'):  # noqa: D102
        x = torch.relu(self.conv1(inputs))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv3(x)), 2)
        logits = self.fc(x.mean((2, 3)))
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits, labels))
        if mode == 'predict':
            return logits.argmax(1)
        return logits


# -- methods ------------------------------------------------------------------------------------
SPARSE_CONVS = r'conv[23]'      # compressible convs (input channels 16 and 32)
BLOCK_SIZE = 8                  # SA++/ACDC: 8x8 blocks -> conv2 has 72 blocks, conv3 288
MIN_BLOCKS = 50                 # paper/default 100 would leave conv2 dense in this tiny net
CGMQ_START_BITS = 8


def _nm(layer: str, n: int, m: int) -> dict:
    return dict(type='ConvertedModel', model=dict(type='DigitsNet'),
                rules=[dict(include=SPARSE_CONVS, layer=dict(type=layer, n=n, m=m))])


def _block(layer: str) -> dict:
    return dict(type='ConvertedModel', model=dict(type='DigitsNet'),
                rules=[dict(include=SPARSE_CONVS,
                            layer=dict(type=layer, block_size=BLOCK_SIZE, min_blocks=MIN_BLOCKS))])


def method_configs(iters: int) -> Dict[str, dict]:
    """``{name: dict(model, optim_wrapper (type + extra keys), hooks, paramwise, desc)}``.

    Schedules are fractions of the fine-tuning length ``iters`` so ``--quick`` keeps their shape.
    """
    big = 10**6  # hook log intervals: log only at the end
    third = max(1, iters // 3)
    u12 = max(1, iters // 12)
    u6 = max(1, iters // 6)
    cfgs = {
        'dense': dict(model=dict(type='DigitsNet'), optim=dict(type='OptimWrapper'), hooks=[],
                      desc='dense fine-tuning (same steps)'),
        'oneshot-2:4': dict(
            model=_nm('OneShotNMConv2d', 2, 4), optim=dict(type='NMSparseOptimWrapper', decay=0.0),
            hooks=[dict(type='MaxQHook', start=0, end=0, interval=big)],
            desc='one-shot magnitude 2:4 (ASP), fixed mask from the pretrained weights'),
        'srste-2:4': dict(
            model=_nm('SRSTEConv2d', 2, 4), optim=dict(type='NMSparseOptimWrapper', decay=2e-4),
            hooks=[dict(type='MaxQHook', start=0, end=0, interval=big)],
            desc='SR-STE 2:4, hard mask every step, decay 2e-4'),
    }
    for n, m in ((2, 4), (1, 16)):
        cfgs[f'maxq-{n}:{m}'] = dict(
            model=_nm('MaxQConv2d', n, m), optim=dict(type='NMSparseOptimWrapper', decay=2e-4),
            hooks=[dict(type='MaxQHook', schedule='cubic', start=0, end=third, interval=big)],
            desc=f'MaxQ {n}:{m}, cubic schedule over iters [0, {third})')
    cfgs['maxq-1:16-k8'] = dict(
        model=_nm('MaxQConv2d', 1, 16), optim=dict(type='NMSparseOptimWrapper', decay=2e-4),
        hooks=[dict(type='MaxQHook', schedule='cubic', start=0, end=third, interval=big,
                    mask_interval=8)],
        desc='MaxQ 1:16 with masks recomputed every 8 steps (mask_interval=8, approximation)')
    for budget, equiv in ((16, 'w4a4'), (8, 'w2a4')):
        cfgs[f'cgmq-{budget}/1024'] = dict(
            model=dict(type='ConvertedModel', model=dict(type='DigitsNet'), rules=[
                dict(include=r'.*', layer=dict(type='CGMQConv2d', bits_w=CGMQ_START_BITS,
                                               bits_a=CGMQ_START_BITS)),
                dict(include=r'.*', layer=dict(type='CGMQLinear', bits_w=CGMQ_START_BITS,
                                               bits_a=CGMQ_START_BITS))]),
            optim=dict(type='CGMQOptimWrapper', R=2.0),
            paramwise=dict(custom_keys={'_gate': dict(decay_mult=0.), '_range': dict(decay_mult=0.)}),
            hooks=[dict(type='CGMQHook', budget_relative=budget / 1024, input_shape=(1, 8, 8),
                        calib_batches=4, interval=big)],
            desc=f'CGMQ from 8/8, budget {budget}/1024 of 32/32 BOPs (= {equiv} on average)',
            budget=budget / 1024)
    if BlockSparseMixin is not None:
        for pct in (70, 90):
            s = pct / 100
            cfgs[f'sapp-{pct}'] = dict(
                model=_block('SAPPConv2d'), optim=dict(type='OptimWrapper'),
                paramwise=dict(custom_keys={'block_logits': dict(decay_mult=0.0, lr_mult=10.0)}),
                hooks=[dict(type='SequentialAttentionHook', sparsity=s, warmup=u12, sparsify=u6,
                            sparse=u12, dense=u12, cycles=2, c=4.0, interval=big)],
                desc=f'SA++ {pct}% of {BLOCK_SIZE}x{BLOCK_SIZE} blocks, 2 cycles, final sparse from '
                     f'iter {u12 + u6 + u12 + u12 + u6}', target=s)
            cfgs[f'acdc-{pct}'] = dict(
                model=_block('MagnitudeBlockConv2d'), optim=dict(type='OptimWrapper'),
                hooks=[dict(type='SequentialAttentionHook', sparsity=s, warmup=u12, sparse=u6,
                            dense=u6, cycles=2, interval=big)],
                desc=f'ACDC {pct}% of {BLOCK_SIZE}x{BLOCK_SIZE} blocks (magnitude), final sparse '
                     f'from iter {u12 + u6 + u6}', target=s)
    return cfgs


QUICK_METHODS = ['dense', 'maxq-2:4', 'cgmq-16/1024', 'sapp-70']


# -- running ------------------------------------------------------------------------------------
def make_runner(model_cfg: dict, work_dir: str, data, seed: int, iters: int, lr: float,
                optim: dict, paramwise: Optional[dict] = None, hooks: Optional[list] = None,
                load_from: Optional[str] = None, batch_size: int = 32,
                log_level: str = 'ERROR') -> Runner:
    """A plain MMEngine Runner: iteration-based, AdamW, cosine LR, no checkpoints, no validation."""
    x_tr, y_tr = data
    optim_wrapper = dict(optim, optimizer=dict(type='AdamW', lr=lr, weight_decay=1e-4))
    if paramwise:
        optim_wrapper['paramwise_cfg'] = paramwise
    return Runner(
        model=model_cfg, work_dir=work_dir,
        train_dataloader=dict(batch_size=batch_size, num_workers=0,
                              dataset=TensorDictDataset(x_tr, y_tr),
                              sampler=dict(type='InfiniteSampler', shuffle=True),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=iters),
        optim_wrapper=optim_wrapper,
        param_scheduler=[dict(type='CosineAnnealingLR', by_epoch=False, begin=0, end=iters,
                              eta_min=lr * 0.01)],
        custom_hooks=hooks or [],
        default_hooks=dict(checkpoint=None, logger=dict(type='LoggerHook', interval=10**6)),
        load_from=load_from, randomness=dict(seed=seed), log_level=log_level,
        experiment_name=f'digits_{uuid.uuid4().hex[:12]}')


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = model(x, mode='predict')
    model.train()
    return float((pred == y).float().mean())


def achieved(model: nn.Module, cfg: dict, runner: Optional[Runner] = None) -> dict:
    """What the final model achieved: N:M sparsity / max nnz, BOPs and bits, block sparsity."""
    out: dict = {}
    stats = model_report(model)
    nm = [s for s in stats if s.max_nnz is not None]
    compressed_numel = sum(s.numel for s in stats if s.reason is None and s.pattern != 'dense')
    total = sum(s.numel for s in stats)
    out['overall_weight_sparsity'] = sum(s.zeros for s in stats) / max(total, 1)
    if nm:
        n, m = map(int, nm[0].pattern.split(':'))
        out['nm_pattern'] = nm[0].pattern
        out['nm_layers'] = [s.name for s in nm]
        out['nm_max_nnz'] = max(s.max_nnz for s in nm)
        out['nm_ok'] = out['nm_max_nnz'] <= n
        out['nm_sparsity'] = sum(s.zeros for s in nm) / max(sum(s.numel for s in nm), 1)
    layers = cgmq_layers(model)
    if layers:
        mods = [lay for _, lay in layers]
        rel = total_bops(mods) / full_precision_bops(mods)
        out['bops_rel'] = rel
        out['bops_budget_rel'] = cfg['budget']
        out['bops_ok'] = rel <= cfg['budget'] + 1e-12
        out['bits'] = {name: f'w{lay.bits_w}a{lay.bits_a}' for name, lay in layers}
        hook = next((h for h in (runner.hooks if runner else []) if type(h).__name__ == 'CGMQHook'),
                    None)
        if hook is not None and hook.trajectory:
            # trajectory: BOPs after each iteration, before the end-of-training greedy fix
            over = [b > hook.budget for _, b in hook.trajectory]
            out['cggd_within_budget_at_end'] = not over[-1]
            out['greedy_fix_used'] = over[-1]
            out['first_iter_within_budget'] = next(
                (i for (i, _), o in zip(hook.trajectory, over) if not o), None)
            out['iters_over_budget_share'] = sum(over) / len(over)
    if BlockSparseMixin is not None:
        blocks = [(n_, lay) for n_, lay in model.named_modules()
                  if isinstance(lay, BlockSparseMixin) and lay.dense_reason is None]
        if blocks:
            per = {n_: block_sparsity(lay.folded_weight(), lay.block_size) for n_, lay in blocks}
            out['block_sparsity'] = per
            out['block_counts'] = {n_: lay.n_blocks for n_, lay in blocks}
            out['block_sparsity_min'] = min(per.values())
            # the hook prunes floor(s*n + 1/2) blocks per layer; count all-zero folded blocks
            out['block_ok'] = all(
                round(per[k] * lay.n_blocks) >= math.floor(cfg['target'] * lay.n_blocks + 0.5)
                for k, lay in blocks)
            dense_block = [n_ for n_, lay in model.named_modules()
                           if isinstance(lay, BlockSparseMixin) and lay.dense_reason is not None]
            out['block_dense_layers'] = dense_block
    out['compressed_weight_share'] = compressed_numel / max(total, 1)
    return out


def _train(runner: Runner, verbose: bool) -> None:
    """``runner.train()``; without ``verbose``, MMEngine's checkpoint-loading prints are swallowed."""
    if verbose:
        runner.train()
        return
    with contextlib.redirect_stdout(io.StringIO()):
        runner.train()


def run_benchmark(methods: List[str], seeds: List[int], pretrain_iters: int, finetune_iters: int,
                  lr: float, ft_lr: float, work_dir: str, log: Callable[[str], None] = print,
                  verbose: bool = False) -> dict:
    x_tr, y_tr, x_te, y_te = load_digits_split()
    cfgs = method_configs(finetune_iters)
    unknown = [m for m in methods if m not in cfgs]
    if unknown:
        raise ValueError(f'unknown or unavailable methods {unknown}; available: {list(cfgs)}')
    log_level = 'INFO' if verbose else 'ERROR'
    results: Dict[str, dict] = {m: dict(desc=cfgs[m]['desc'], runs=[]) for m in methods}
    pretrain_acc = []
    t_start = time.perf_counter()
    for seed in seeds:
        t0 = time.perf_counter()
        runner = make_runner(dict(type='DigitsNet'), osp.join(work_dir, f'pre_s{seed}'),
                             (x_tr, y_tr), seed, pretrain_iters, lr, dict(type='OptimWrapper'),
                             log_level=log_level)
        _train(runner, verbose)
        pretrain_acc.append(accuracy(runner.model, x_te, y_te))
        ckpt = osp.join(work_dir, f'dense_pretrained_s{seed}.pth')
        # plain tensors only: loads with torch.load(weights_only=True)
        torch.save(dict(state_dict={k: v.detach().clone() for k, v in
                                    runner.model.state_dict().items()}), ckpt)
        log(f'seed {seed}: dense pretrain {pretrain_iters} iters -> test acc '
            f'{pretrain_acc[-1]:.4f} ({time.perf_counter() - t0:.1f}s)')
        for name in methods:
            cfg = cfgs[name]
            t0 = time.perf_counter()
            runner = make_runner(cfg['model'], osp.join(work_dir, f'{name.replace("/", "_")}_s{seed}'),
                                 (x_tr, y_tr), seed, finetune_iters, ft_lr, cfg['optim'],
                                 cfg.get('paramwise'), cfg['hooks'], load_from=ckpt,
                                 log_level=log_level)
            _train(runner, verbose)
            model = runner.model
            run = dict(seed=seed, acc=accuracy(model, x_te, y_te),
                       train_acc=accuracy(model, x_tr, y_tr),
                       seconds=time.perf_counter() - t0)
            run.update(achieved(model, cfg, runner))
            results[name]['runs'].append(run)
            log(f'  {name:14s} acc {run["acc"]:.4f}  {_achieved_str(run)}  ({run["seconds"]:.1f}s)')
    for res in results.values():
        accs = [r['acc'] for r in res['runs']]
        res['acc_mean'] = statistics.fmean(accs)
        res['acc_std'] = statistics.stdev(accs) if len(accs) > 1 else 0.0
        res['acc_min'], res['acc_max'] = min(accs), max(accs)
        res['seconds_mean'] = statistics.fmean(r['seconds'] for r in res['runs'])
        oks = [r[k] for r in res['runs'] for k in ('nm_ok', 'bops_ok', 'block_ok') if k in r]
        res['verified'] = all(oks) if oks else None
        res['achieved'] = _achieved_str(res['runs'][0] if len(res['runs']) == 1 else _mean_run(res['runs']))
    return dict(
        benchmark='sklearn digits accuracy', methods=methods, seeds=seeds,
        pretrain_iters=pretrain_iters, finetune_iters=finetune_iters, lr=lr, finetune_lr=ft_lr,
        batch_size=32, split=dict(train=len(y_tr), test=len(y_te), stratified=True, random_state=0),
        pretrain_acc=dict(mean=statistics.fmean(pretrain_acc),
                          std=statistics.stdev(pretrain_acc) if len(pretrain_acc) > 1 else 0.0,
                          runs=pretrain_acc),
        results=results, wall_seconds=time.perf_counter() - t_start,
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     torch=torch.__version__, python=platform.python_version()))


def _mean_run(runs: List[dict]) -> dict:
    """A run-like dict with numeric achievements averaged over seeds (for the table)."""
    out = dict(runs[0])
    for key in ('nm_sparsity', 'bops_rel', 'block_sparsity_min', 'overall_weight_sparsity'):
        if key in out:
            out[key] = statistics.fmean(r[key] for r in runs)
    if 'nm_max_nnz' in out:
        out['nm_max_nnz'] = max(r['nm_max_nnz'] for r in runs)
    out['n_runs'] = len(runs)
    if 'greedy_fix_used' in out:
        out['greedy_fix_used_count'] = sum(bool(r.get('greedy_fix_used')) for r in runs)
    if 'bits' in out:  # bit widths of every seed, per layer
        out['bits'] = {k: '/'.join(sorted({r['bits'][k] for r in runs})) for k in out['bits']}
    return out


def _achieved_str(run: dict) -> str:
    if 'nm_pattern' in run:
        return (f'{run["nm_pattern"]} on {"+".join(run["nm_layers"])}: {run["nm_sparsity"]:.1%} zeros, '
                f'max nnz/block {run["nm_max_nnz"]}')
    if 'bops_rel' in run:
        bits = ' '.join(f'{k}:{v}' for k, v in run['bits'].items())
        greedy = run.get('greedy_fix_used_count', int(run.get('greedy_fix_used', False)))
        return (f'BOPs {run["bops_rel"] * 1024:.2f}/1024 of 32/32 (budget '
                f'{run["bops_budget_rel"] * 1024:g}/1024); {bits}; greedy end fix in '
                f'{greedy}/{run.get("n_runs", 1)} runs')
    if 'block_sparsity' in run:
        return (f'{BLOCK_SIZE}x{BLOCK_SIZE} zero blocks on conv2+conv3: min '
                f'{run["block_sparsity_min"]:.1%}')
    return f'{run["overall_weight_sparsity"]:.1%} zeros'


def markdown_table(report: dict) -> str:
    pre = report['pretrain_acc']
    lines = [
        f'Test accuracy on sklearn digits (540 test images), {len(report["seeds"])} seeds '
        f'({", ".join(map(str, report["seeds"]))}), mean ± sample std; every method fine-tunes '
        f'{report["finetune_iters"]} iterations from the same per-seed dense model pretrained '
        f'{report["pretrain_iters"]} iterations (its accuracy: '
        f'{100 * pre["mean"]:.2f} ± {100 * pre["std"]:.2f}%).', '',
        '| method | test acc. (%) | min–max (%) | achieved (final model) | verified | s/run |',
        '| --- | --- | --- | --- | --- | --- |']
    for name in report['methods']:
        r = report['results'][name]
        ver = {True: 'yes', False: '**NO**', None: '—'}[r['verified']]
        lines.append(f'| {name} | {100 * r["acc_mean"]:.2f} ± {100 * r["acc_std"]:.2f} | '
                     f'{100 * r["acc_min"]:.2f}–{100 * r["acc_max"]:.2f} | {r["achieved"]} | {ver} | '
                     f'{r["seconds_mean"]:.1f} |')
    lines += ['', f'Wall time {report["wall_seconds"]:.0f} s; machine: {report["machine"]["cpu_count"]} '
              f'CPU cores, torch {report["machine"]["torch"]} with '
              f'{report["machine"]["torch_threads"]} thread(s).']
    return '\n'.join(lines) + '\n'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--methods', nargs='+', help='methods to run (default: all available; '
                        '--quick: ' + ' '.join(QUICK_METHODS) + ')')
    parser.add_argument('--seeds', type=int, nargs='+', help='default 0 1 2 3 4 (--quick: 0)')
    parser.add_argument('--pretrain-iters', type=int, help='dense pretraining (default 600, quick 60)')
    parser.add_argument('--finetune-iters', type=int, help='per method (default 600, quick 36)')
    parser.add_argument('--lr', type=float, default=3e-3, help='pretraining AdamW lr')
    parser.add_argument('--finetune-lr', type=float, default=1e-3, help='fine-tuning AdamW lr')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (default 1)')
    parser.add_argument('--quick', action='store_true', help='1 seed, few iterations, 4 methods')
    parser.add_argument('--out', help='directory for results.json and results.md')
    parser.add_argument('--verbose', action='store_true', help='MMEngine INFO logs')
    parser.add_argument('--list', action='store_true', help='list the methods and exit')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    available = list(method_configs(600))
    if args.list:
        for name, cfg in method_configs(600).items():
            print(f'{name:14s} {cfg["desc"]}')
        return {}
    quick = args.quick
    methods = args.methods or ([m for m in QUICK_METHODS if m in available] if quick else available)
    seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2, 3, 4])
    pre = args.pretrain_iters or (60 if quick else 600)
    ft = args.finetune_iters or (36 if quick else 600)
    with tempfile.TemporaryDirectory(prefix='bench_acc_') as work_dir:
        report = run_benchmark(methods, seeds, pre, ft, args.lr, args.finetune_lr, work_dir,
                               verbose=args.verbose)
    report['command'] = 'python tools/benchmark_accuracy.py ' + ' '.join(
        sys.argv[1:] if argv is None else argv)
    table = markdown_table(report)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_json(osp.join(args.out, 'results.json'), report, indent=1)
        atomic_write(osp.join(args.out, 'results.md'), lambda tmp: Path(tmp).write_text(table))
        print(f'wrote {osp.join(args.out, "results.json")} and results.md')
    return report


if __name__ == '__main__':
    main()
