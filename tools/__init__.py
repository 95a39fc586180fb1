"""Kernel-development tools: variant sweeps, A/B runs, load-only floors, Nsight Compute probes.

Not installed (not part of the adaspa-jax distribution); run from the repository root,
e.g. ``python -m tools.mosaic_variants check``, with the package installed (``make test``
installs it). Results and the commands that made them: docs/log/mosaic.md.
"""
