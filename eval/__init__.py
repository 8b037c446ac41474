"""Evaluation harness and tasks, shipped as ``hf_kan.eval``."""
