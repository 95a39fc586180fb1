"""Brute-force numpy baseline policies written from the spec, loop by loop (shares no code
with adaspa_jax). Sets are per (batch, head, query block); text query rows keep every block.

Query blocks may be larger than key blocks (``query_block_size``, a multiple of the key
block size): ``query_text`` [nQ] then marks the query blocks holding a text token."""

import math
from fractions import Fraction

import numpy as np

from tests.numpy_selection import budget

SAMPLE_ROWS = 64


def _blocks(text):
  video = [c for c in range(len(text)) if not text[c]]
  return video, [c for c in range(len(text)) if text[c]]


def _recall(mass, sets, text):
  """[B, H]: mass kept over total, video query rows only (text: per query row)."""
  b_, h_, n_q, _ = mass.shape
  out = np.ones((b_, h_))
  for b in range(b_):
    for h in range(h_):
      kept = sum(mass[b, h, p, c] for p in range(n_q) if not text[p] for c in sets[b][h][p])
      total = sum(mass[b, h, p].sum() for p in range(n_q) if not text[p])
      out[b, h] = kept / total if total > 0 else 1.0
  return out


def topp(mass, p, text, query_text=None):
  """Fewest video blocks (highest mass first, ties lower id, at least one) reaching p of the
  row's video mass, in exact rational arithmetic. Returns (sets, counts, recall, sparsity)."""
  b_, h_, n_q, n_k = mass.shape
  video, texts = _blocks(text)
  row_text = text if query_text is None else query_text
  sets = [[[None] * n_q for _ in range(h_)] for _ in range(b_)]
  counts = np.zeros((b_, h_, n_q), int)
  spars = np.zeros((b_, h_))
  for b in range(b_):
    for h in range(h_):
      kept_blocks = 0
      for r in range(n_q):
        if row_text[r]:
          sets[b][h][r] = set(range(n_k))
        else:
          row = [Fraction(float(mass[b, h, r, c])) for c in range(n_k)]
          target = Fraction(p) * sum(row[c] for c in video)
          kept, acc = [], Fraction(0)
          for c in sorted(video, key=lambda c: (-row[c], c)):
            if kept and acc >= target:
              break
            kept.append(c)
            acc += row[c]
          sets[b][h][r] = set(kept) | set(texts)
          kept_blocks += len(kept)
        counts[b, h, r] = len(sets[b][h][r])
      n_rows = sum(1 for r in range(n_q) if not row_text[r])
      spars[b, h] = 1.0 - kept_blocks / (n_rows * len(video)) if video else 0.0
  return sets, counts, _recall(np.asarray(mass, np.float64), sets, row_text), spars


def _softmax_rows(q, k, rows, allowed, lengths):
  """Exact probabilities [len(rows), S] of one (batch, head); allowed: bool [len(rows), S]."""
  d = q.shape[-1]
  out = np.zeros((len(rows), k.shape[0]))
  for t, r in enumerate(rows):
    if r >= lengths:
      continue
    keys = [c for c in range(min(lengths, k.shape[0])) if allowed[t][c]]
    if not keys:
      continue
    s = k[keys] @ q[r] / math.sqrt(d)
    e = np.exp(s - s.max())
    out[t, keys] = e / e.sum()
  return out


def svg_geometry(text, seq_len, block_size, frame_tokens):
  """Per block: (frame, in-frame position, centre) of its centre token in video tokens."""
  geo, video_before = [], 0
  for c in range(len(text)):
    size = min(block_size, seq_len - c * block_size)
    centre = video_before + (size - 1) / 2
    frame = math.floor(centre / frame_tokens)
    geo.append((frame, centre - frame * frame_tokens, centre))
    if not text[c]:
      video_before += size
  return geo


def svg_query_geometry(text, seq_len, block_size, frame_tokens, query_block_size):
  """Per query block: (frame, in-frame position, centre) of its centre token, counted in
  video tokens (tokens of text key blocks skipped), token by token."""
  geo = []
  for c in range(-(-seq_len // query_block_size)):
    first = c * query_block_size
    size = min(query_block_size, seq_len - first)
    video_before = sum(1 for t in range(first) if not text[t // block_size])
    centre = video_before + (size - 1) / 2
    frame = math.floor(centre / frame_tokens)
    geo.append((frame, centre - frame * frame_tokens, centre))
  return geo


def svg_patterns(text, seq_len, block_size, frame_tokens, k, query_block_size=None):
  """(spatial, temporal): per query block the k video blocks, best first."""
  geo = svg_geometry(text, seq_len, block_size, frame_tokens)
  qgeo = geo if query_block_size is None else svg_query_geometry(
      text, seq_len, block_size, frame_tokens, query_block_size)
  video, _ = _blocks(text)
  spatial, temporal = [], []
  for i in range(len(qgeo)):
    fi, pi, ci = qgeo[i]
    spatial.append(sorted(video, key=lambda j: (abs(geo[j][0] - fi), abs(geo[j][2] - ci), j))[:k])
    temporal.append(sorted(video, key=lambda j: (abs(geo[j][1] - pi), abs(geo[j][0] - fi), j))[:k])
  return spatial, temporal


def svg_rows(text, seq_len, block_size):
  video = [r for r in range(seq_len) if not text[r // block_size]]
  n = min(SAMPLE_ROWS, len(video))
  return [video[((2 * t + 1) * len(video)) // (2 * n)] for t in range(n)]


def svg(q, k, v, sparsity, text, block_size, frame_tokens, lengths=None, query_block_size=None,
        query_text=None):
  """Returns (use_spatial bool [B, H], sets, recall estimate [B, H], errors [B, H, 2])."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, s, h_, _ = q.shape
  video, texts = _blocks(text)
  kb = budget(sparsity, len(video))
  qbs = block_size if query_block_size is None else query_block_size
  row_text = text if query_text is None else query_text
  patterns = svg_patterns(text, s, block_size, frame_tokens, kb, query_block_size)
  rows = svg_rows(row_text, s, qbs)
  use_spatial, recall = np.zeros((b_, h_), bool), np.ones((b_, h_))
  errors = np.zeros((b_, h_, 2))
  sets = [[None] * h_ for _ in range(b_)]
  for b in range(b_):
    n = s if lengths is None else int(lengths[b])
    for h in range(h_):
      dense = _softmax_rows(q[b, :, h], k[b, :, h], rows, np.ones((len(rows), s), bool), n)
      kept = []
      for which, pattern in enumerate(patterns):
        allowed = np.zeros((len(rows), s), bool)
        for t, r in enumerate(rows):
          for c in list(pattern[r // qbs]) + texts:
            allowed[t, c * block_size:(c + 1) * block_size] = True
        masked = _softmax_rows(q[b, :, h], k[b, :, h], rows, allowed, n)
        errors[b, h, which] = ((masked @ v[b, :, h] - dense @ v[b, :, h]) ** 2).sum()
        kept.append((dense * allowed).sum())
      use_spatial[b, h] = errors[b, h, 0] <= errors[b, h, 1]
      chosen = patterns[0] if use_spatial[b, h] else patterns[1]
      recall[b, h] = kept[0 if use_spatial[b, h] else 1] / dense.sum() if dense.sum() else 1.0
      sets[b][h] = [set(range(len(text))) if row_text[i] else set(chosen[i]) | set(texts)
                    for i in range(len(row_text))]
  return use_spatial, sets, recall, errors


def minference(q, k, sparsity, text, block_size, lengths=None, query_block_size=None,
               query_text=None):
  """Returns (sets, recall estimate [B, H]). A query block larger than a key block scores
  key block j by the sum over its key-block-sized parts f of vertical[j] + slash[|j - f|]."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b_, s, h_, _ = q.shape
  n_k = len(text)
  video, texts = _blocks(text)
  kb = budget(sparsity, len(video))
  qbs = block_size if query_block_size is None else query_block_size
  row_text = text if query_text is None else query_text
  r_ = qbs // block_size
  last = [i for i in range(len(row_text)) if not row_text[i]][-1]
  rows = list(range(last * qbs, min((last + 1) * qbs, s)))
  sets = [[None] * h_ for _ in range(b_)]
  recall = np.ones((b_, h_))
  for b in range(b_):
    n = s if lengths is None else int(lengths[b])
    for h in range(h_):
      p = _softmax_rows(q[b, :, h], k[b, :, h], rows, np.ones((len(rows), s), bool), n)
      vertical, slash = np.zeros(n_k), np.zeros(n_k + 1)
      for t, r in enumerate(rows):
        for c in range(s):
          if text[c // block_size]:
            continue
          vertical[c // block_size] += p[t, c]
          slash[math.floor(abs(c - r) / block_size + 0.5)] += p[t, c]
      rows_sets = []
      for i in range(len(row_text)):
        if row_text[i]:
          rows_sets.append(set(range(n_k)))
          continue
        parts = range(i * r_, min((i + 1) * r_, n_k))
        score = {j: sum(vertical[j] + slash[abs(j - f)] for f in parts) for j in video}
        ranked = sorted(video, key=lambda j: (-score[j], j))
        rows_sets.append(set(ranked[:kb]) | set(texts))
      sets[b][h] = rows_sets
      keep = [c for c in range(s) if c // block_size in rows_sets[last]]
      recall[b, h] = p[:, keep].sum() / p.sum() if p.sum() else 1.0
  return sets, recall


def recall_of(mass, sets, text):
  return _recall(np.asarray(mass, np.float64), sets, text)
