"""Training: options, optimizers, the jitted steps, devices, checkpoints, transfer learning,
the epoch loop and what it reports."""
