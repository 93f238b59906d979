"""Datasets shipped with mmsparse."""
from .demo_coco import DEMO_CLASSES, make_demo_coco

__all__ = ['DEMO_CLASSES', 'make_demo_coco']
