"""ContentV inference in PyTorch (CUDA, Ascend NPU, CPU): models with diffusers key names, pipeline, generate."""
