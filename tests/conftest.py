"""Shared pytest setup: several fake CPU devices, so data-parallel code is exercised."""
import os

import jax

# Must happen before any JAX computation; four devices let tests compare 1- and 4-way steps.
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = os.environ.get(
    "CIRCLEMIX_SHARED_DATA",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glomeruli-bueno"),
)
