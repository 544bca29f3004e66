"""File mechanics that know nothing of runs: atomic writes, locks, crash-safe replacement, ownership.

Modules: ``atomic`` (write to a temporary name, rename into place; checksums; path checks),
``lock`` (one command at a time per folder), ``replace`` (swap a folder for a new one under a
journal), ``ownership`` (the ``.featx-edge`` marker: only what this tool made is ever deleted).

May import: errors only.
"""
