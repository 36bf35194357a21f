"""mmjax: a JAX/Flax training stack for unified multimodal models."""
