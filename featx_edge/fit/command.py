"""``featx-edge fit``: the search, its table, and the chosen model trained and exported into ``--out``.

Example:
    >>> from featx_edge.config import RunConfig, DataConfig
    >>> result = fit_run(RunConfig(data=DataConfig(path="sample")), profile="cortex-m7-1m",
    ...                  out="runs/m7")  # doctest: +SKIP
    >>> print(result.table)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from featx_edge.config import RunConfig, override
from featx_edge.errors import ConfigError, FitError
from featx_edge.files.atomic import write_json
from featx_edge.files.lock import locked
from featx_edge.fit.parts import KIB, Profile, get_profile, tflm_arena, verdict
from featx_edge.fit.search import FIT_FORMAT, Row, best, default_alphas, default_sizes, grid, search, shortfall
from featx_edge.rundir.names import FIT_JSON

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    rows: list[Row]
    table: str
    chosen: Row
    final: dict = field(default_factory=dict)  # the exported file's flash, arena and verdict (with --out)


def fit_run(config: RunConfig, *, profile: str, out: str | Path | None = None, overwrite: bool = False,
            cuts: tuple[str | None, ...] | None = None, sizes: tuple[int, ...] | None = None,
            alphas: tuple[float | None, ...] | None = None, npu: str | None = None) -> FitResult:
    """Search cut x size x width under ``profile``; with ``out``, train and export the best there.

    Raises:
        ConfigError: an unknown profile, cut, size or width (before any work).
        FitError: no candidate fits (the smallest figures against the part's), or the final export
            does not (the figures).
    """
    from featx_edge.data.folders import scan_folder, split_folder
    from featx_edge.mcu.vela import parse_npu
    from featx_edge.training.model import check_cut, stage_outputs
    from featx_edge.training.train import check_destination

    part = get_profile(profile)
    npu = parse_npu(npu)[0] if npu else part.npu  # an unknown configuration is refused here, before any work
    data_root = check_destination(config, out)[0] if out is not None else _data_root(config)
    cuts = cuts or tuple(p.name for p in stage_outputs(config.model))
    check_cut(config.model, cuts)  # layer names are the same at every size and width
    candidates = grid(config, cuts=cuts, sizes=sizes or default_sizes(config),
                      alphas=alphas or default_alphas(config))
    splits = split_folder(scan_folder(data_root), val_fraction=config.data.val_fraction,
                          test_fraction=config.data.test_fraction, seed=config.seed)
    rows = search(config, candidates, profile=part, splits=splits, npu=npu)
    table = format_table(rows, part)
    chosen = best(rows)
    if chosen is None:
        raise FitError(refusal(rows, part))
    result = FitResult(rows=rows, table=table, chosen=chosen)
    if out is not None:
        result.final = _train_and_export(config, chosen, out=Path(out), overwrite=overwrite, profile=part,
                                         rows=rows)
    return result


def _data_root(config: RunConfig) -> Path:
    from featx_edge.data.sample import resolve_data
    from featx_edge.errors import DataError

    root = resolve_data(config.data.path, part="all")
    if not root.is_dir():
        raise DataError(f"data folder `{root}` does not exist or is not a folder. Pass a folder with one "
                        "sub-folder per class, or `--data sample`.")
    return root


def _train_and_export(config: RunConfig, chosen: Row, *, out: Path, overwrite: bool, profile: Profile,
                      rows: list[Row]) -> dict:
    """Train the chosen candidate into ``out`` (the user's training settings), export int8, measure it again."""
    from featx_edge.export import export_run
    from featx_edge.training.train import train_run

    c = chosen.candidate
    final_config = override(config, "model", cut_at=c.cut_at, image_size=c.size, alpha=c.alpha)
    with locked(out, command="fit", create=True):
        train_run(final_config, out, overwrite=overwrite)
        manifest = export_run(out, formats=(FIT_FORMAT,))
        path = out / manifest["artifacts"][FIT_FORMAT]["path"]
        final = {"format": FIT_FORMAT, "path": manifest["artifacts"][FIT_FORMAT]["path"],
                 "flash_bytes": path.stat().st_size, "arena_bytes": tflm_arena(path)}
        final["verdict"] = verdict(profile, arena_bytes=final["arena_bytes"], model_bytes=final["flash_bytes"])
        write_json(out / FIT_JSON, {"profile": profile.name, "part": profile.part, "chosen": chosen.to_dict(),
                                    "final": final, "candidates": [row.to_dict() for row in rows],
                                    "judged_on": "validation split"})
    if not final["verdict"]["fits"]:
        raise FitError(f"the exported `{out / final['path']}` does not fit {profile.name}: "
                       f"{shortfall(final['verdict'])}; the search's figures were of the model without metadata. "
                       "Pick the next row of the table with `--cut-at`/`--image-sizes`.")
    return final


def format_table(rows: list[Row], profile: Profile) -> str:
    """The Pareto table: fitting candidates best first (``*`` on the front, ``>`` the chosen), then the rest."""
    head = (f"fit for {profile.name} ({profile.part}): RAM {profile.ram_bytes / KIB:,.0f} KiB (runtime reserve "
            f"{profile.runtime_reserve_bytes / KIB:,.0f}), flash {profile.flash_bytes / KIB:,.0f} KiB (code reserve "
            f"{profile.code_reserve_bytes / KIB:,.0f}); judged on the validation split")
    columns = (f"  {'candidate (cut @ size x width)':<44} {'val acc':>7} {'arena KiB':>9} {'flash KiB':>9} "
               f"{'Vela ms':>8}  status")
    lines = [head, columns]
    chosen = best(rows)
    for row in rows:
        mark = ">" if row is chosen else "*" if row.pareto else " "
        acc = f"{row.val_accuracy:.4f}" if row.val_accuracy is not None else "-"
        vela = f"{row.vela_ms:.2f}" if row.vela_ms is not None else "-"
        status = row.status if row.status == "fits" else f"{row.status}: {row.note or shortfall(row.verdict)}"
        lines.append(f"{mark} {row.candidate.label():<44} {acc:>7} {_kib(row.arena_bytes):>9} "
                     f"{_kib(row.flash_bytes):>9} {vela:>8}  {status}")
    lines.append("* Pareto front (no other fitting row is as accurate, as small in RAM and in flash); > chosen. "
                 "Arena: TFLM's recording allocator; flash: the int8 .tflite bytes; Vela: its estimate.")
    return "\n".join(lines)


def refusal(rows: list[Row], profile: Profile) -> str:
    """One line: nothing fits, with the smallest arena and model found (or their lower bounds) against the room."""
    room_ram = profile.ram_bytes - profile.runtime_reserve_bytes
    room_flash = profile.flash_bytes - profile.code_reserve_bytes
    sized = [row for row in rows if row.verdict is not None]
    found = "TFLM could run none of them"
    if sized:
        ram = min(sized, key=lambda row: row.verdict["ram"]["arena"])
        flash = min(sized, key=lambda row: row.verdict["flash"]["model"])
        bound = " (lower bounds: none was converted)" if all(row.status == "pruned" for row in sized) else ""
        found = (f"the smallest arena was {ram.verdict['ram']['arena']:,} B ({ram.candidate.label()}), the smallest "
                 f"model {flash.verdict['flash']['model']:,} B ({flash.candidate.label()}){bound}")
    return (f"no candidate of {len(rows)} fits {profile.name}: it has {room_ram:,} B of RAM for the arena and "
            f"{room_flash:,} B of flash for the model after the reserves; {found}. Try earlier cuts (`--cut-at`), "
            "smaller sizes (`--image-sizes`) or widths (`--alphas`), or a larger part.")


def _kib(n: int | None) -> str:
    return f"{n / KIB:,.1f}" if n is not None else "-"


def parse_cuts(text: str) -> tuple[str | None, ...]:
    """``--cut-at`` of fit: comma-separated layer names; ``none`` is the whole backbone."""
    names = tuple(None if name.strip().lower() == "none" else name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ConfigError(f"`--cut-at` takes comma-separated layer names (or `none`); received `{text}`.")
    return names
