# CGMQ pieces shared by the configs in configs/cgmq, which read them as ``_base_.cgmq.<name>``
# (mmengine has no private base variables: ``cgmq`` and ``quant`` stay in the resolved configs,
# unused by any builder; tools/fold.py leaves ``cgmq`` out of the plain config):
# * rules: every conv and linear layer becomes a CGMQ layer (weights per output channel, input
#   activations per tensor) starting at 8/8 bits, for ``ConvertedModel``;
# * optim_wrapper: the constraint-guided wrapper (extra gate gradient R·|grad|·d over the budget);
#   gates and ranges take no weight decay (decay would pull every gate toward its switching point).
quant = dict(bits_w=8, bits_a=8)
cgmq = dict(
    rules=[
        dict(include=r'.*', layer=dict(type='CGMQConv2d', **quant)),
        dict(include=r'.*', layer=dict(type='CGMQLinear', **quant)),
    ],
    optim_wrapper=dict(
        type='CGMQOptimWrapper',
        R=2.0,
        paramwise_cfg=dict(custom_keys={'_gate': dict(decay_mult=0.0),
                                        '_range': dict(decay_mult=0.0)})))
