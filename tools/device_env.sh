# Source from the repository root on the GPU machine, where nothing can be pip-installed
# from the network: lays the installed package layout (adaspa_jax.models, .harness,
# .experiments, .checkpoints; pallas_kernels) out of symbolic links under /tmp/site, puts
# it on PYTHONPATH, sets REPO to the repository root and changes to /tmp so that the
# repository's own adaspa_jax/ folder does not shadow it.
REPO=$PWD
site=/tmp/site
rm -rf "$site" && mkdir -p "$site/adaspa_jax"
for f in "$REPO"/adaspa_jax/*; do ln -s "$f" "$site/adaspa_jax/"; done
for p in models harness experiments checkpoints; do ln -s "$REPO/$p" "$site/adaspa_jax/$p"; done
ln -s "$REPO/pallas_kernels" "$site/pallas_kernels"
export PYTHONPATH=$site REPO
cd /tmp
