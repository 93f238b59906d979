"""Folding to plain mmdet checkpoints, verification, ONNX export, compressed formats."""
