"""Training of D-GRU-aware models (needs the ``torch`` extra: ``pip install torch==2.13.0``).

- :mod:`.torch_model`: the D-GRU layer and the mask model in PyTorch (forward = npdgru.reference)
- :mod:`.data`: on-the-fly mixtures from ``../shared/data`` (never the test noise or testset)
- :mod:`.loop`: the training loop, checkpoints, logs; ``npdgru train`` / ``python -m npdgru.train``

Nothing here is imported by the inference code; ``import npdgru`` never imports torch.
"""
