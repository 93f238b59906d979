"""Shared fixtures: a tiny generated COCO dataset (helpers for configs and tools: helpers.py)."""
import pytest


@pytest.fixture(scope='session')
def tiny_coco(tmp_path_factory) -> str:
    """8 train / 4 val images at ~96 px, generated once per session."""
    from mmsparse.datasets import make_demo_coco
    out = str(tmp_path_factory.mktemp('tiny_coco'))
    make_demo_coco(out, num_train=8, num_val=4, img_size=96, seed=0, max_objects=3)
    return out
