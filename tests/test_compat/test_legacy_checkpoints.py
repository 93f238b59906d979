"""Checkpoints saved by an earlier mmsparse (tests/data/legacy, see legacy_checkpoints.py) still load
under the same key names, resume to the end of training and fold to the same weights."""
import os.path as osp

import pytest
import torch
from mmengine.hooks import Hook

from mmsparse.export import fold_state_dict, verify_folded

from legacy_checkpoints import DATA, MAX_ITERS, METHODS, LegacyToy, legacy_runner


@pytest.mark.parametrize('method', sorted(METHODS))
def test_legacy_checkpoint_keys_match_the_model(method):
    saved = torch.load(osp.join(DATA, f'{method}_iter_2.pth'), weights_only=True)['state_dict']
    assert sorted(saved) == sorted(LegacyToy(method).state_dict())


@pytest.mark.parametrize('method', sorted(METHODS))
def test_legacy_checkpoint_resumes_and_folds_as_before(tmp_path, method):
    """Resumed at iteration 2 and trained to the end by this code, the model folds to the weights
    the earlier code folded at the end of the same run (the run is deterministic on CPU)."""
    path = osp.join(DATA, f'{method}_iter_2.pth')
    saved = torch.load(path, weights_only=True)['state_dict']
    runner = legacy_runner(method, str(tmp_path), resume=True, load_from=path,
                           experiment_name=f'legacy-{method}-{tmp_path.name}')
    loaded = {}
    runner.register_hook(_Capture(loaded), priority='VERY_HIGH')
    runner.train()
    assert runner.iter == MAX_ITERS
    for key in LegacyToy(method).compression_keys():
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0, msg=key)
    state, specs = fold_state_dict(runner.model)
    verify_folded(state, specs)
    expected = torch.load(osp.join(DATA, f'{method}_folded.pth'), weights_only=True)
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


class _Capture(Hook):
    """Records the compression state that resume loaded, before any method hook changes it."""

    def __init__(self, into: dict):
        self.into = into

    def before_train(self, runner):
        model = runner.model
        self.into.update({k: v.detach().clone() for k, v in model.state_dict().items()
                          if k in model.compression_keys()})
