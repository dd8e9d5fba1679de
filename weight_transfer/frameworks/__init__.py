"""The parts that import JAX or PyTorch: our two models from and to flat arrays (bridges),
sharded loading, runners, random weights."""
