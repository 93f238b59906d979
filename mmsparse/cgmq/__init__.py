"""CGMQ: constraint-guided mixed-precision quantization under a hard BOPs budget."""
