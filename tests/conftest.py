"""Shared test settings: fp32 matmuls everywhere so parity tolerances are meaningful."""
import jax

jax.config.update("jax_default_matmul_precision", "highest")
