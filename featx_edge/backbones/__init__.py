"""Pretrained backbones: the registry of specs, their weights, and the EfficientNet-Lite builder.

Modules: ``registry`` (``BACKBONES``: name -> frozen ``BackboneSpec``), ``weights`` (resolving
``--weights``: Keras cache/download, package-shipped files), ``efficientnet_lite`` (the Keras
builder and the checkpoint conversion), ``torch_state`` (a memory-safe reader of ``.pth`` files).

May import: errors, progress, files, _tf. Nothing of data, training or later stages.
"""
