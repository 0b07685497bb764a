"""Model code: layers, layer stacks, the chunk VAE, the flow model, the autoregressive
LM, flow-matching maths and samplers, token choice and FLOP counts.

Pure model code: imports nothing of tokcom_jax outside `models/` and `errors`
(tests/test_package.py pins it).
"""
