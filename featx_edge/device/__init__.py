"""Emulated-target checks: run exported models on emulated CPU cores (QEMU user mode).

``featx-edge device-check RUN --arch arm64 --cpu cortex-a53,cortex-a72`` builds (once, cached)
an arm64 Python from Debian's packages and PyPI's aarch64 wheels, runs every export's self-test
and a prediction comparison against the host under ``qemu-aarch64-static -cpu CORE``, and
reports agreement per format and core. Emulation proves the kernels and numerics on that ISA
and core model, never speed.

Modules: ``cores`` (architectures, named cores, the guest's /proc/cpuinfo), ``env`` (building
the cached sysroot and wheels), ``emulator`` (running the guest under QEMU), ``guest`` (the code
that runs inside the emulated Python: the runtime only), ``compare`` (host-side metrics) and
``check`` (the command). Only this package knows about QEMU; it shells out to apt-get, dpkg-deb,
pip and qemu.

This file imports nothing: the guest imports ``featx_edge.device.guest``, which must pull in
the runtime and nothing else.

May import: verify, training (``Run``), fidelity, data, rundir, files, formats, runtime and the leaves.
"""
