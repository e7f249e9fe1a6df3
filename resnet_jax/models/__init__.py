"""The architectures: the registry of facts, the Flax Linen modules, their NNX form, and the
evaluation preprocessing that training and inference share."""
