"""Weight converters between diffusers / original PyTorch layouts and the Flax parameter trees."""
