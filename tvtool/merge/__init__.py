"""The one merge path: θ1 + α·M as a stream of row chunks, its settings, the operators, kernels, `materialize`."""
