"""The embedded text-to-video model: a tiny CogVideoX trained on coloured-shapes clips.

``model`` (the transformer, sampling inputs, checkpoints, presets), ``text`` (its
tokenizer and text encoder), ``data`` (the procedural clips and their caption grammar),
``caption_check`` (scores a clip against its caption from the pixels) and ``training``
(rectified-flow training on clips drawn on the fly). The shipped checkpoint is
``checkpoints/tiny_t2v``; docs/tiny_t2v.md has its training runs and evaluation.
"""
