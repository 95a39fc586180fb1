"""Thin absl launchers, run as ``python -m adaspa_jax.experiments.<name>``; their library is
``adaspa_jax.harness``."""
