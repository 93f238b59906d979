import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config

import mmsparse  # noqa: F401
from mmsparse.export import (FOLD_META_KEY, PatternViolationError, fold_checkpoint, plain_config,
                             verify_checkpoint)
from mmsparse.export.plain_config import mmsparse_type_names

from export_helpers import REPO
from predict_plain import predict

TOOL = osp.join(REPO, 'tools', 'fold.py')
PY = sys.executable


def test_folded_checkpoint_is_plain_and_exact(sparse_ckpt, folded):
    _, _, model = sparse_ckpt
    ckpt = torch.load(folded.checkpoint, map_location='cpu', weights_only=True)  # stock loading
    state, meta = ckpt['state_dict'], ckpt['meta']
    assert not [k for k in state if k.endswith(('.mask', 'mask'))]
    dense_keys = {k for k in model.state_dict() if not k.endswith('.mask')}
    assert set(state) == dense_keys  # original module names, nothing else
    fold = meta[FOLD_META_KEY]
    assert fold['mmsparse_version'] == mmsparse.__version__
    assert len(fold['source_sha256']) == 64
    layers = fold['layers']
    assert layers['backbone.layer1.0.conv1'] == dict(method='maxq', pattern='1:16')
    stem = layers['backbone.conv1']
    assert stem['pattern'] == 'dense' and 'dense by rule' in stem['reason']
    assert layers['neck.fpn_convs.0.conv'] == dict(method='srste', pattern='2:4')
    assert layers['roi_head.bbox_head.shared_fcs.0'] == dict(method='maxq', pattern='2:8')
    module = dict(model.named_modules())['backbone.layer2.0.conv2']
    w = state['backbone.layer2.0.conv2.weight']
    torch.testing.assert_close(w, module.weight * module.mask, rtol=0, atol=0)
    assert (w == 0).float().mean() == pytest.approx(15 / 16)
    assert not torch.signbit(w[w == 0]).any()  # exact +0.0
    assert meta['dataset_meta']['classes'][0] == 'circle'


def test_plain_config_has_no_mmsparse(folded):
    cfg = Config.fromfile(folded.config, import_custom_modules=False)
    text = open(folded.config).read()
    for name in mmsparse_type_names() | {'mmsparse', 'ConvertedModel'}:
        assert f"'{name}'" not in text, name
    assert cfg.model.type == 'MaskRCNN' and cfg.model.backbone.conv_cfg is None
    assert cfg.optim_wrapper.type == 'OptimWrapper' and 'decay' not in cfg.optim_wrapper
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=10.0)
    assert 'custom_hooks' not in cfg and 'custom_imports' not in cfg
    assert 'safe_checkpoint' not in cfg.default_hooks and 'checkpoint' in cfg.default_hooks
    assert cfg.load_from is None


def test_plain_config_refuses_unknown_mmsparse_types():
    cfg = Config(dict(model=dict(type='MaskRCNN', backbone=dict(type='ResNet', act_cfg=dict(
        type='MaxQConv2d'))), custom_hooks=[]))
    with pytest.raises(ValueError, match=r'model\.backbone\.act_cfg'):
        plain_config(cfg)


@pytest.mark.slow
def test_parity_stock_mmdet_subprocess(sparse_ckpt, folded, val_images, tmp_path):
    """The folded checkpoint in a process that never imports mmsparse predicts what the sparse model
    predicts (bboxes, scores, labels, masks)."""
    cfg_path, _, model = sparse_ckpt
    out = str(tmp_path / 'plain.npz')
    env = dict(os.environ, PYTHONPATH='')
    subprocess.run([PY, osp.join(osp.dirname(__file__), 'predict_plain.py'), folded.config,
                    folded.checkpoint, out, *val_images], check=True, env=env, cwd=str(tmp_path))
    plain = dict(np.load(out))
    assert not plain.pop('mmsparse_imported')
    ref = predict(model, Config.fromfile(cfg_path), val_images)
    assert set(plain) == set(ref)
    for key, value in ref.items():
        assert plain[key].shape == value.shape, key
        if key.endswith(('labels', 'masks')):
            np.testing.assert_array_equal(plain[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(plain[key], value, rtol=0, atol=1e-4, err_msg=key)
    assert sum(ref[f'{i}_scores'].size for i in range(len(val_images))) > 0


def _tamper(src, dst, key):
    ckpt = torch.load(src, map_location='cpu', weights_only=True)
    w = ckpt['state_dict'][key]
    blocks = w.permute(0, 2, 3, 1).reshape(-1, 16)
    zero = int(torch.nonzero(blocks[0] == 0)[0])
    w[0, zero, 0, 0] = 0.5  # one extra non-zero in block (0, 0, 0, 0)
    torch.save(ckpt, dst)


def test_verify_refuses_tampered_checkpoint(folded, tmp_path):
    violations, report = verify_checkpoint(folded.checkpoint)
    assert violations == [] and report
    bad = str(tmp_path / 'tampered.pth')
    _tamper(folded.checkpoint, bad, 'backbone.layer3.0.conv1.weight')
    violations, _ = verify_checkpoint(bad)
    assert len(violations) == 1
    assert violations[0].layer == 'backbone.layer3.0.conv1' and violations[0].block == (0, 0, 0, 0)
    res = subprocess.run([PY, TOOL, '--verify', bad], capture_output=True, text=True)
    assert res.returncode == 1
    assert 'backbone.layer3.0.conv1: block (0, 0, 0, 0) has 2 non-zeros' in res.stderr
    res = subprocess.run([PY, TOOL, '--verify', folded.checkpoint], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert 'satisfies' in res.stdout and '1:16' in res.stdout
    # explicit pattern on any checkpoint
    res = subprocess.run([PY, TOOL, '--verify', folded.checkpoint, '--pattern', '1:16', '--layers',
                          r'backbone\.layer\d\.\d\.conv\d'], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([PY, TOOL, '--verify', folded.checkpoint, '--pattern', '1:16', '--layers',
                          r'neck\.fpn_convs\.\d\.conv'], capture_output=True, text=True)
    assert res.returncode == 1 and 'neck.fpn_convs.0.conv: block' in res.stderr


def test_fold_refuses_broken_pattern_and_writes_nothing(sparse_ckpt, tmp_path):
    cfg_path, ckpt, _ = sparse_ckpt
    state = torch.load(ckpt, map_location='cpu', weights_only=True)
    key = 'backbone.layer2.1.conv1.mask'
    state['state_dict'][key][3, :, 1, 1] = 1.0  # a whole dense block: 16 non-zeros
    bad = str(tmp_path / 'bad.pth')
    torch.save(state, bad)
    out = tmp_path / 'out'
    with pytest.raises(PatternViolationError, match=r'backbone\.layer2\.1\.conv1: block \(3, 1, 1, 0\)'):
        fold_checkpoint(cfg_path, bad, str(out))
    assert not out.exists() or not os.listdir(out)
    res = subprocess.run([PY, TOOL, cfg_path, bad, '--out-dir', str(out)], capture_output=True,
                         text=True)
    assert res.returncode == 1 and 'backbone.layer2.1.conv1: block (3, 1, 1, 0)' in res.stderr
    assert not out.exists() or not os.listdir(out)


def test_fold_refuses_missing_masks(sparse_ckpt, tmp_path):
    cfg_path, ckpt, _ = sparse_ckpt
    state = torch.load(ckpt, map_location='cpu', weights_only=True)
    state['state_dict'] = {k: v for k, v in state['state_dict'].items() if not k.endswith('mask')}
    bad = str(tmp_path / 'dense.pth')
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match='misses'):
        fold_checkpoint(cfg_path, bad, None)


@pytest.mark.slow
def test_fold_cli(sparse_ckpt, tmp_path):
    cfg_path, ckpt, _ = sparse_ckpt
    res = subprocess.run([PY, TOOL, cfg_path, ckpt, '--out-dir', str(tmp_path), '--name', 'm',
                          '--compressed'], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert 'backbone.layer1.0.conv1' in res.stdout and 'overall weight sparsity' in res.stdout
    assert 'compressed layers only, packed fp32' in res.stdout
    assert sorted(os.listdir(tmp_path)) == ['m.pth', 'm.py', 'm.safetensors']


def test_atomic_write_keeps_old_file_on_failure(folded, tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous folded checkpoint intact (and no temp file)."""
    from mmsparse.utils import atomic_write
    target = str(tmp_path / 'model.pth')
    with open(folded.checkpoint, 'rb') as f:
        original = f.read()
    with open(target, 'wb') as f:
        f.write(original)

    def dies(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'partial')
        raise KeyboardInterrupt  # e.g. Ctrl-C / kill during torch.save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies)
    assert open(target, 'rb').read() == original
    assert os.listdir(tmp_path) == ['model.pth']


def test_killed_fold_leaves_old_file_intact(sparse_ckpt, folded, tmp_path):
    """SIGKILL during the real torch.save of fold: the old output survives untouched."""
    cfg_path, ckpt, _ = sparse_ckpt
    target = tmp_path / 'x_folded.pth'
    target.write_bytes(b'old')
    script = (
        'import os, signal, torch, sys\n'
        'import mmsparse.export.fold as fold\n'
        'real = torch.save\n'
        'def save(obj, f, *a, **k):\n'
        '    open(f, "wb").write(b"partial")\n'
        '    os.kill(os.getpid(), signal.SIGKILL)\n'
        'fold.torch.save = save\n'
        f'fold.fold_checkpoint({cfg_path!r}, {ckpt!r}, {str(tmp_path)!r}, out_name="x_folded")\n')
    res = subprocess.run([PY, '-c', script], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr[-2000:]
    assert target.read_bytes() == b'old'
    assert not (tmp_path / 'x_folded.py').exists()


def test_report_cli_reads_a_training_checkpoint_and_writes_nothing(sparse_ckpt, tmp_path):
    cfg_path, ckpt, model = sparse_ckpt
    before = sorted(os.listdir(osp.dirname(ckpt)))
    res = subprocess.run([PY, TOOL, cfg_path, ckpt, '--report'], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # the layer's share of zeros, computed independently from the trained mask
    layer = model.backbone.layer1[0].conv1
    zeros = float((layer.weight * layer.mask == 0).float().mean())
    row = next(line for line in res.stdout.splitlines() if 'backbone.layer1.0.conv1 ' in line)
    assert '1:16' in row and f'{100 * zeros:.2f}%' in row, row
    assert 'dense: the 3-channel stem is dense by rule' in res.stdout
    assert sorted(os.listdir(osp.dirname(ckpt))) == before and os.listdir(tmp_path) == []
    state = torch.load(ckpt, weights_only=True)['state_dict']
    del state['backbone.layer1.0.conv1.mask']
    torch.save(dict(state_dict=state), tmp_path / 'nomask.pth')
    res = subprocess.run([PY, TOOL, cfg_path, str(tmp_path / 'nomask.pth'), '--report'],
                         capture_output=True, text=True)
    assert res.returncode == 2 and 'backbone.layer1.0.conv1.mask' in res.stderr
