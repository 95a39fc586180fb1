"""Query blocks larger than key blocks (``query_block_size=``), on top of square kernels.

With ``query_block_size = r * block_size`` (r a power of two, see
``validation.check_query_block_size``) a block list has one row per query block
of ``query_block_size`` rows, nQ = ceil(S / query_block_size), and its entries
are key blocks of ``block_size`` keys (nK = ceil(S / block_size)); a block mass
is [B, H, nQ, nK]. Every implementation serves such calls with its square
kernels for now:

* block-sparse attention: each coarse row's list is repeated for its r fine
  query blocks (``expand_lists``), which read the same key blocks: the output is
  exact, the K/V traffic that of the square kernel;
* block mass: the fine [B, H, nQf, nK] mass summed over the r fine rows of each
  query block (``coarsen_mass``). The mass is a plain sum over query rows (not a
  per-row mean), so the coarse mass is the same sum over the larger block:
  ``mass[b, h, p, c] = sum_{i in query block p, j in key block c} exp(s_ij - lse_i)``.

Only a kernel that reads one list per 128-row CTA (the Mosaic path's native
128 x 64 kernel, to come) turns the coarser lists into speed.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import validation


def ratio(query_block_size: int, block_size: int) -> int:
  """Fine query blocks per query block (checked sizes)."""
  return validation.check_query_block_size(query_block_size, block_size) // block_size


def expand_lists(indices, counts, *, seq: int, block_size: int, query_block_size: int):
  """Lists with a row per query block -> a row per fine query block of ``block_size``.

  Args:
    indices: int32 [B, H, nQ, K_max], nQ = ceil(seq / query_block_size).
    counts: int32 [B, H, nQ].

  Returns:
    int32 [B, H, nQf, K_max] and [B, H, nQf], nQf = ceil(seq / block_size): fine query
    block i reads the list of query block i // r (unchanged when r = 1).
  """
  r = ratio(query_block_size, block_size)
  if r == 1:
    return indices, counts
  n_fine = validation.num_blocks(seq, block_size)
  return (jnp.repeat(indices, r, axis=2)[:, :, :n_fine],
          jnp.repeat(counts, r, axis=2)[:, :, :n_fine])


def coarsen_mass(mass, *, seq: int, block_size: int, query_block_size: int):
  """Block mass [B, H, nQf, nK] at ``block_size`` query rows -> [B, H, nQ, nK] at
  ``query_block_size`` rows: the sum of each query block's fine rows (unchanged when
  r = 1)."""
  r = ratio(query_block_size, block_size)
  if r == 1:
    return mass
  b, h, n_fine, n_k = mass.shape
  n_q = validation.num_blocks(seq, query_block_size)
  mass = jnp.pad(mass, ((0, 0), (0, 0), (0, n_q * r - n_fine), (0, 0)))
  return mass.reshape(b, h, n_q, r, n_k).sum(3)


def checked_sparse_call(q, k, v, kv_block_indices, kv_block_counts, *, block_size, kv_lengths,
                        sm_scale, query_block_size, expand: bool = True):
  """The block-sparse prologue every implementation shares: checks the call
  (``validation.block_sparse_call`` at ``query_block_size``), clamps the lists in bounds
  (``validation.safe_block_lists``) and, with ``expand``, repeats them to ``block_size``-row
  query blocks (``expand_lists``; a no-op at square blocks).

  Returns:
    (qbs, (b, s, h, d, block_size, n_blk, kv_lengths, scale, lengths), indices, counts)
    with ``validation.block_sparse_call``'s tuple in the middle.
  """
  qbs = validation.check_query_block_size(query_block_size, block_size)
  call = validation.block_sparse_call(q, k, v, kv_block_indices, kv_block_counts, block_size,
                                      kv_lengths, sm_scale, qbs)
  s, block_size, n_blk = call[1], call[4], call[5]
  indices, counts = validation.safe_block_lists(kv_block_indices, kv_block_counts, n_blk)
  if expand:
    indices, counts = expand_lists(indices, counts, seq=s, block_size=block_size,
                                   query_block_size=qbs)
  return qbs, call, indices, counts
