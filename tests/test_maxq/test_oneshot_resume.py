"""A resumed one-shot run whose checkpoint lacks the fixed masks is refused (the masks were chosen
from the weights at the start and cannot be recovered from the trained weights)."""
import pytest
import torch
from helpers import tiny_config
from mmengine.config import Config
from mmengine.runner import Runner

ONESHOT = 'configs/demo/oneshot_mask-rcnn_r18_1-16_demo.py'
LAYER = 'backbone.layer1.0.conv1'


def _runner(tiny_coco, tmp_path, name, **updates) -> Runner:
    # the shared SanityCheckHook refuses this checkpoint first; here MaxQHook's own guard is tested
    cfg = Config.fromfile(tiny_config(ONESHOT, tiny_coco, str(tmp_path / name),
                                      **{'load_from': None, **updates}))
    cfg.default_hooks.pop('sanity_check')
    return Runner.from_cfg(cfg)


def _checkpoint(tiny_coco, tmp_path, iteration: int) -> str:
    state = _runner(tiny_coco, tmp_path, 'build').model.state_dict()
    del state[f'{LAYER}.mask']
    path = str(tmp_path / f'iter_{iteration}.pth')
    torch.save(dict(state_dict=state, meta=dict(iter=iteration, epoch=0)), path)
    return path


def test_resume_without_one_shot_mask_is_refused(tiny_coco, tmp_path):
    ckpt = _checkpoint(tiny_coco, tmp_path, iteration=2)
    runner = _runner(tiny_coco, tmp_path, 'resume', resume=True, load_from=ckpt)
    with pytest.raises(RuntimeError, match=f"no one-shot mask for \\['{LAYER}'\\]"):
        runner.load_or_resume()


def test_load_from_without_one_shot_mask_computes_it(tiny_coco, tmp_path):
    ckpt = _checkpoint(tiny_coco, tmp_path, iteration=2)   # e.g. a dense mid-run checkpoint
    _runner(tiny_coco, tmp_path, 'load', load_from=ckpt).load_or_resume()
