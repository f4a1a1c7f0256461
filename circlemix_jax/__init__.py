"""circlemix_jax: CircleMix, EfficientNet-B0 and hierarchical learning for glomeruli, in JAX/Flax."""

__version__ = "0.1.0"
