"""SequentialAttention++: block sparsification with attention scores and ACDC phases."""
