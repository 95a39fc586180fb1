"""Brute-force numpy selection written from the spec, loop by loop (shares no code with adaspa_jax)."""

import math

import numpy as np


def budget(s, n_video):
  if n_video == 0:
    return 0
  return min(n_video, max(1, math.floor((1.0 - s) * n_video + 0.5)))


def select(mass, sparsity, text, head_adaptive=True, threshold=0.8, query_text=None):
  """Returns (sets [B][H][nQ] of block ids, counts [B,H,nQ], recall [B,H], sparsity [B,H]).

  ``query_text`` [nQ]: the query rows holding text (dense) when query blocks are larger
  than key blocks; None: ``text`` (square blocks)."""
  mass = np.asarray(mass, np.float64)
  b_, h_, n_q, n_k = mass.shape
  text = np.zeros(n_k, bool) if text is None else np.asarray(text)
  qtext = text if query_text is None else np.asarray(query_text)
  video = [c for c in range(n_k) if not text[c]]
  texts = [c for c in range(n_k) if text[c]]

  def rows_for(b, h, k):
    out = []
    for p in range(n_q):
      ranked = sorted(video, key=lambda c: (-mass[b, h, p, c], c))
      out.append(set(ranked[:k]) | set(texts))
    return out

  def recall(b, h, k):
    chosen = rows_for(b, h, k)
    kept = total = 0.0
    for p in range(n_q):
      if qtext[p]:
        continue
      kept += sum(mass[b, h, p, c] for c in chosen[p])
      total += mass[b, h, p].sum()
    return 1.0 if total <= 0 else kept / total

  k_base = budget(sparsity, len(video))
  # Paper tiers; below s = 1/3 the low tier clamps at 0 and the high tier is 2s (mean kept).
  k_hi = budget((1 + sparsity) / 2 if 3 * sparsity >= 1 else 2 * sparsity, len(video))
  k_lo = budget(max(0.0, (3 * sparsity - 1) / 2), len(video))
  sets, counts = [], np.zeros((b_, h_, n_q), int)
  rec, spa = np.zeros((b_, h_)), np.zeros((b_, h_))
  for b in range(b_):
    base = [recall(b, h, k_base) for h in range(h_)]
    ks = [k_base] * h_
    if head_adaptive:
      n = min(sum(r > threshold for r in base), h_ // 2)
      order = sorted(range(h_), key=lambda h: (-base[h], h))
      for h in order[:n]:
        ks[h] = k_hi
      for h in order[h_ - n:] if n else []:
        ks[h] = k_lo
    sets.append([])
    for h in range(h_):
      rows = rows_for(b, h, ks[h])
      for p in range(n_q):
        if qtext[p]:
          rows[p] = set(range(n_k))
        counts[b, h, p] = len(rows[p])
      sets[-1].append(rows)
      rec[b, h] = recall(b, h, ks[h])
      spa[b, h] = 1.0 - ks[h] / len(video) if video else 0.0
  return sets, counts, rec, spa


def assert_lists_equal_sets(indices, counts, sets, n_k):
  """Kernel-format lists [B, H, nQ, K_max] / counts [B, H, nQ] hold exactly ``sets``
  [B][H][nQ] (ascending, padded with the row's last id; a count >= n_k key blocks is a
  dense row whose set must be every block)."""
  idx, cnt = np.asarray(indices), np.asarray(counts)
  for pos in np.ndindex(cnt.shape):
    want = sets[pos[0]][pos[1]][pos[2]]
    if cnt[pos] >= n_k:
      assert want == set(range(n_k)), pos
      continue
    assert list(idx[pos][:cnt[pos]]) == sorted(want), (pos, idx[pos], want)
    assert np.all(idx[pos][cnt[pos]:] == idx[pos][cnt[pos] - 1])
