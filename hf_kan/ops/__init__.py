"""Compute ops: a pure-PyTorch reference beside every fast path (Triton, fused CPU).

Nothing under ``hf_kan.ops`` imports Transformers.
"""
