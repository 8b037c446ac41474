"""Reusable ``nn.Module`` building blocks (GR-KAN activation, KAN attention operators, drop path, ViT embeddings)."""
