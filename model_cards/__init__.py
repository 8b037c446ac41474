"""Model-card templates, shipped as package data of ``hf_kan.model_cards``."""
