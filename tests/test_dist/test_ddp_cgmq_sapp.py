"""CGMQ, SA++ and ACDC on two CPU processes (gloo) through tools/dist_train.sh: every rank's state.

Each rank writes its compression state after calibration and after every step
(``rank_state_hook.RankStateDumpHook``); the ranks train on different images and must still hold
bit-identical gates, ranges, logits and supports, and only rank 0 may log.
"""
import glob
import json
import os
import os.path as osp
import sys

import pytest
import torch
from helpers import ROOT, tiny_config
from proc_helpers import free_port, run_group
from rank_state_hook import load_dump

pytestmark = pytest.mark.slow
HERE = osp.dirname(osp.abspath(__file__))

CGMQ = 'configs/cgmq/cgmq_mask-rcnn_r18_fpn_demo_w4a4-budget.py'
SAPP = 'configs/sapp/demo/sapp_mask-rcnn_r18_fpn_b16-70_demo.py'
ACDC = 'configs/sapp/demo/acdc_mask-rcnn_r18_fpn_b16-70_demo.py'
# (config, hook, iterations, final log line); SA++: dense [0,1) sparsify [1,3) sparse [3,4)
# dense [4,5) sparsify [5,7) final sparse [7,8); ACDC: dense [0,1) sparse [1,3) dense [3,4)
# final sparse [4,6)
RUNS = {
    'cgmq': (CGMQ, dict(type='CGMQHook', budget_relative=16 / 1024, input_shape=(3, 96, 96),
                        num_rois=16, calib_batches=2, interval=1), 4, 'CGMQHook: final model'),
    'sapp': (SAPP, dict(type='SequentialAttentionHook', sparsity=0.7, warmup=1, sparsify=2,
                        sparse=1, dense=1, cycles=2, interval=1), 8,
             'SequentialAttentionHook: final block sparsity'),
    'acdc': (ACDC, dict(type='SequentialAttentionHook', sparsity=0.7, warmup=1, sparse=2, dense=1,
                        cycles=2, interval=1), 6, 'SequentialAttentionHook: final block sparsity'),
}


def run_ddp(method: str, tiny_coco: str, work_dir: str) -> str:
    """Train ``method``'s tiny config on 2 processes (batch 1 each); return the combined log."""
    base, hook, iters, _ = RUNS[method]
    cfg = tiny_config(base, tiny_coco, work_dir, max_iters=iters, ckpt_interval=iters, **{
        'load_from': None, 'train_dataloader.batch_size': 1, 'train_cfg.val_begin': iters + 1,
        'custom_hooks': [hook, dict(type='RankStateDumpHook')],
        'custom_imports': dict(imports=['mmsparse', 'rank_state_hook'], allow_failed_imports=False)})
    env = {**os.environ, 'PYTHON': sys.executable, 'PORT': str(free_port()),
           'OMP_NUM_THREADS': '1',
           'PYTHONPATH': os.pathsep.join(filter(None, [HERE, os.environ.get('PYTHONPATH')]))}
    proc = run_group(['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), cfg, '2'], timeout=900,
                     cwd=ROOT, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


@pytest.mark.parametrize('method', ['cgmq', 'sapp', 'acdc'])
def test_two_process_ranks_hold_identical_state(method, tiny_coco, tmp_path):
    _, _, iters, final_line = RUNS[method]
    log = run_ddp(method, tiny_coco, str(tmp_path))
    assert 'differ across ranks' not in log
    seen = []
    for step in range(iters + 1):
        r0, r1 = (load_dump(str(tmp_path), step, rank) for rank in (0, 1))
        assert r0['state'] and set(r0['state']) == set(r1['state'])
        for key, value in r0['state'].items():
            torch.testing.assert_close(r1['state'][key], value, rtol=0, atol=0,
                                       msg=f'{method} step {step}: {key}')
        assert r0['params'] == r1['params'], f'{method} step {step}: weights differ across ranks'
        if step:
            assert r0['img_ids'] and r0['img_ids'] != r1['img_ids']  # ranks saw different images
            seen.append((r0['img_ids'], r1['img_ids']))
        if step == iters:
            bn = sum(r0['buffers'][k] != r1['buffers'][k] for k in r0['buffers'])
            print(f'{method}: rank 0 / rank 1 images per step {seen}; after {iters} steps '
                  f'{bn}/{len(r0["buffers"])} other buffers (batch-norm statistics, '
                  'broadcast_buffers=False) differ across ranks')
    # reports and scalars come from rank 0 only: each appears once, one log file, one scalar row
    assert log.count(final_line) == 1
    run_dir = next(d for d in glob.glob(str(tmp_path / '2*')) if osp.isdir(d))
    assert len(glob.glob(osp.join(run_dir, '*.log'))) == 1
    with open(osp.join(run_dir, 'vis_data', 'scalars.json')) as f:
        iters_logged = [json.loads(line)['iter'] for line in f if '"loss"' in line]
    assert iters_logged == list(range(1, iters + 1))
    state = load_dump(str(tmp_path), iters, 0)['state']
    if method == 'cgmq':
        assert log.count('CGMQHook: calibrated ranges of 38 layers on 2 training batches') == 1
        assert all(state[k] for k in state if k.endswith('.calibrated'))
    else:
        pruned = [(v == 0).float().mean().item() for k, v in state.items()
                  if k.endswith('.support')]
        assert pruned and min(pruned) >= 0.69, pruned  # final sparse phase: 70% of the blocks
