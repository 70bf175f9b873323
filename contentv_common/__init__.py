"""Framework-free pieces shared by the JAX and PyTorch code: configs, presets, sin-cos tables and
flow-matching schedules. numpy only, so neither framework is needed to import it."""
