"""Convolutions, pooling and BatchNorm sums below the models: XLA's own ops steered around
XLA:CPU's slow paths, and the optional compiled CPU extension (csrc/)."""
