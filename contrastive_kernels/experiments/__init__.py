"""Paper experiments, each a self-contained script with ``main(argv) -> int``.

Run them through the CLI: ``contrastive-kernels experiment synthetic|digits|modality [options]`` (or
``python -m contrastive_kernels experiment ...``); ``--help`` lists each one's options.

- ``synthetic``: the known-optimum problem of docs/math.md §3 — minibatch InfoNCE vs the stochastic-EM
  estimators (``gamma``, ``ema``) of :class:`contrastive_kernels.gamma.GammaContrastiveLoss`.
- ``digits``: self-supervised training on scikit-learn's bundled 8×8 digits across batch sizes,
  scored by a linear probe on frozen features.
- ``modality``: a two-modality problem with a controlled information gap (P2, CVPR 2023) — the
  contrastive base loss alone vs + feature separation / Brownian bridge / geometric consistency.
"""
