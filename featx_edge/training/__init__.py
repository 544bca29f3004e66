"""The training flow: features from the frozen backbone, the head, fine-tuning, the Keras reference.

Modules: ``features`` (embedding and the on-disk feature cache), ``model`` (``build_classifier``:
one flat functional graph), ``cut`` (cut points of a backbone: ``--cut-at``), ``train`` (head
training, the fine-tune stage, writing a new run), ``checkpoints`` (resumable state), ``distribute`` (device strategies), ``pretrain`` (a backbone
pretrained on a source task), ``run`` (``Run``: a trained run directory, opened and checked,
with its Keras reference rebuilt from its weights).

May import: data, backbones, config, rundir, files, formats, runtime and the leaves. Never
export, verify, bench, report, device or cli.
"""
