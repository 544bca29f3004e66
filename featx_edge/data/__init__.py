"""Images in: scanning and validating labelled folders, splits, streaming batches, augmentation.

Modules: ``folders`` (scan, validate, split, ``iter_batches``), ``augment`` (train-time views),
``sample`` (the bundled sample dataset). The first stage of the flow.

May import: errors, progress, files, runtime (its image decoding, so a device reads an image
exactly as training did). Nothing of training, export or later stages.
"""
