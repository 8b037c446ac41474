"""Attention patches for multimodal LLMs, shipped as ``hf_kan.patches``."""
