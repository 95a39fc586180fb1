"""The evaluation and benchmark harness the launchers in ``experiments/`` import.

Free of absl flags, so tests and notebooks import it. ``generation`` (models, inputs,
dense vs AdaSpa runs and reports of ``experiments/generate.py``), ``demo`` (the embedded
default, ``make demo``), ``embedded_eval`` (held-out prompts and caption checks of the
embedded model), ``e2e`` + ``e2e_report`` (end-to-end speed), ``ablations`` +
``ablation_report`` (the paper's ablations), ``metrics`` (PSNR, SSIM), ``synthetic``
(one attention layer on synthetic inputs).
"""
