"""Models that fit a microcontroller: ``featx-edge fit`` searches cut point x image size (x width).

Modules: ``search`` (sizing each candidate's int8 architecture with TFLM's arena, judging those that
fit on the validation split, the Pareto front), ``command`` (the search, its table, and the chosen
model trained, exported and measured again into ``--out``, with ``RUN/fit.json``), ``parts`` (what
fit needs of ``featx_edge.mcu``: profiles and their verdict, TFLM's arena, Vela's estimate).

May import: mcu, training (the cut classifier, ``train_run``), export (the int8 converter,
``export_run``), data, backbones, config, rundir, files, formats and the leaves. Never bench, report,
device or cli.
"""
