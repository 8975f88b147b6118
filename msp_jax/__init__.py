"""msp-jax: Mixture of Soft Prompts for controllable data generation, in JAX/Flax."""
from msp_jax.models.weights import Backbone, DEFAULT_BACKBONE, load_backbone

__all__ = ["Backbone", "DEFAULT_BACKBONE", "load_backbone"]
