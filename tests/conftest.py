"""Test-session settings shared by every test module."""

import jax

# Run CPU computations on the calling thread. JAX's Mosaic GPU interpreter runs each
# warpgroup of a CTA as its own jitted computation on its own Python thread, and the
# warpgroups wait on each other (mbarriers) inside those computations. With async
# dispatch they all queue on XLA's CPU worker pool, which on a 2-core machine can be
# too small to hold them at once: the suite then hung in
# test_mosaic_block_mass.py (2026-12-06). Inline, every warpgroup runs on its own thread.
jax.config.update("jax_cpu_enable_async_dispatch", False)
