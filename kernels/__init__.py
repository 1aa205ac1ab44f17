"""Triton kernels for the EqM hot path, each beside its plain-PyTorch reference."""
