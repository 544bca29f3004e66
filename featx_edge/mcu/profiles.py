"""Microcontroller profiles: RAM and flash of common parts, where each figure comes from, and the fit verdict.

A leaf (imports only ``errors``). Fit = the model's tensor arena plus a stated runtime reserve
within RAM, and the model's bytes plus a stated code reserve within flash. The reserves are what a
TensorFlow Lite Micro application needs beside the model: the runtime reserve holds the stack, the
interpreter and op-resolver objects, the RTOS and the camera or I/O buffers; the code reserve holds
the TFLM library with CMSIS-NN kernels (about 100 KB for a full op resolver), the application and
its start-up code. They are estimates, stated so a user can judge them; the arena and the model
bytes are measured.

Example:
    >>> from featx_edge.mcu.profiles import get_profile, fit
    >>> fit(get_profile("cortex-m4-256k"), arena_bytes=134_048, model_bytes=630_000)["fits"]
    True
"""

from __future__ import annotations

from dataclasses import dataclass

from featx_edge.errors import ConfigError, name_list

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Profile:
    """One microcontroller part.

    Attributes:
        name: the name used by ``--profile`` and in ``mcu.json``.
        part: the part (and board, where flash is off-chip) the figures are for.
        core: the CPU core (and NPU).
        ram_bytes: on-chip RAM an application can use.
        flash_bytes: flash (or MRAM) for code and the model.
        source: the datasheet the figures come from.
        runtime_reserve_bytes: RAM kept for everything but the tensor arena.
        code_reserve_bytes: flash kept for the TFLM library, the application and start-up code.
        npu: the Vela accelerator configuration of the part's NPU, if it has one.
        note: what a user should know about the figures.
    """

    name: str
    part: str
    core: str
    ram_bytes: int
    flash_bytes: int
    source: str
    runtime_reserve_bytes: int
    code_reserve_bytes: int
    npu: str | None = None
    note: str = ""


_BARE_METAL_RUNTIME = 32 * KIB  # stack, TFLM interpreter and resolver, a small RTOS, I/O buffers
_TFLM_CODE = 128 * KIB  # TFLM with CMSIS-NN kernels for a classifier's ops, application, start-up

PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("cortex-m4-256k", part="Nordic nRF52840", core="Cortex-M4F @ 64 MHz", ram_bytes=256 * KIB,
            flash_bytes=1 * MIB, source="nRF52840 Product Specification v1.7 (256 KB RAM, 1 MB flash)",
            runtime_reserve_bytes=_BARE_METAL_RUNTIME, code_reserve_bytes=_TFLM_CODE,
            note="the BLE SoftDevice, if used, takes a further ~6-40 KB RAM and ~150 KB flash"),
    Profile("cortex-m7-320k", part="STMicroelectronics STM32F746NG", core="Cortex-M7 @ 216 MHz",
            ram_bytes=320 * KIB, flash_bytes=1 * MIB,
            source="STM32F745xx/STM32F746xx datasheet DS10916 (320 KB SRAM incl. 64 KB DTCM, 1 MB flash)",
            runtime_reserve_bytes=_BARE_METAL_RUNTIME, code_reserve_bytes=_TFLM_CODE),
    Profile("cortex-m7-1m", part="STMicroelectronics STM32H743ZI", core="Cortex-M7 @ 480 MHz",
            ram_bytes=1 * MIB, flash_bytes=2 * MIB,
            source="STM32H742xI/G STM32H743xI/G datasheet DS12110 (1 MB RAM, 2 MB flash)",
            runtime_reserve_bytes=64 * KIB, code_reserve_bytes=_TFLM_CODE,
            note="the RAM is in several banks (largest contiguous: 512 KB AXI SRAM); an arena above that "
                 "needs a linker script that joins banks or external SDRAM"),
    Profile("cortex-m33-786k", part="STMicroelectronics STM32U585AI", core="Cortex-M33 @ 160 MHz",
            ram_bytes=786 * KIB, flash_bytes=2 * MIB,
            source="STM32U585xx datasheet DS13086 (786 KB SRAM, 2 MB flash)",
            runtime_reserve_bytes=_BARE_METAL_RUNTIME, code_reserve_bytes=_TFLM_CODE),
    Profile("esp32-s3", part="Espressif ESP32-S3-WROOM-1-N8 module", core="Xtensa LX7 dual core @ 240 MHz",
            ram_bytes=512 * KIB, flash_bytes=8 * MIB,
            source="ESP32-S3 Series Datasheet (512 KB internal SRAM); ESP32-S3-WROOM-1 datasheet (N8: 8 MB flash)",
            runtime_reserve_bytes=160 * KIB, code_reserve_bytes=512 * KIB,
            note="ESP-IDF, FreeRTOS and Wi-Fi use much of the internal SRAM (hence the larger reserve); "
                 "modules with PSRAM (N8R8) can hold a larger arena there, more slowly; TFLM runs with "
                 "ESP-NN kernels here, not CMSIS-NN"),
    Profile("rp2350", part="Raspberry Pi RP2350 on a Pico 2", core="Cortex-M33 dual core @ 150 MHz",
            ram_bytes=520 * KIB, flash_bytes=4 * MIB,
            source="RP2350 Datasheet (520 KB SRAM); Raspberry Pi Pico 2 Datasheet (4 MB QSPI flash)",
            runtime_reserve_bytes=_BARE_METAL_RUNTIME, code_reserve_bytes=_TFLM_CODE),
    Profile("cortex-m55-ethos-u55", part="Alif Semiconductor Ensemble E7 (high-performance subsystem)",
            core="Cortex-M55 @ 400 MHz with Ethos-U55-256", ram_bytes=4 * MIB, flash_bytes=int(5.5 * MIB),
            source="Alif whitepaper AWPR0003 'RAM Regions and Linker Files' (SRAM0 bulk bank 4096 KB); "
                   "Ensemble E7 datasheet (5.5 MB MRAM)",
            runtime_reserve_bytes=64 * KIB, code_reserve_bytes=256 * KIB, npu="ethos-u55-256",
            note="RAM counts one general-purpose SRAM bank; the part has more banks and TCM"),
)}
"""The shipped profiles, smallest RAM first within each core family."""


def get_profile(name: str) -> Profile:
    """The profile called ``name``; ConfigError naming the choices otherwise."""
    if name not in PROFILES:
        raise ConfigError(f"unknown microcontroller profile `{name}`; allowed: {', '.join(PROFILES)}. "
                          "Run `featx-edge mcu --profile list` to see their RAM, flash and sources.")
    return PROFILES[name]


def parse_profiles(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``--profile`` (a comma-separated string or a list) as known profile names, each once."""
    if value is None:
        return ()
    names = name_list("profiles", value, what="profile names")
    return tuple(dict.fromkeys(get_profile(name).name for name in names))


def fit(profile: Profile, *, arena_bytes: int, model_bytes: int) -> dict:
    """Whether a model with ``arena_bytes`` of arena and ``model_bytes`` of flatbuffer fits ``profile``.

    Margins are what is left (negative: the shortfall), for RAM and flash each.
    """
    ram_needed = arena_bytes + profile.runtime_reserve_bytes
    flash_needed = model_bytes + profile.code_reserve_bytes
    ram = {"available": profile.ram_bytes, "arena": arena_bytes, "reserve": profile.runtime_reserve_bytes,
           "needed": ram_needed, "margin": profile.ram_bytes - ram_needed}
    flash = {"available": profile.flash_bytes, "model": model_bytes, "reserve": profile.code_reserve_bytes,
             "needed": flash_needed, "margin": profile.flash_bytes - flash_needed}
    return {"profile": profile.name, "part": profile.part, "ram": ram, "flash": flash,
            "fits": ram["margin"] >= 0 and flash["margin"] >= 0}


def misfit_line(fmt: str, verdict: dict) -> str:
    """One line saying by how much ``fmt`` misses the profile of ``verdict`` (RAM, flash or both)."""
    parts = []
    for kind, what, reserve in (("ram", "arena", "runtime reserve"), ("flash", "model", "code reserve")):
        row = verdict[kind]
        if row["margin"] < 0:
            parts.append(f"{kind.upper() if kind == 'ram' else kind} needs {row['needed']:,} B ({what} "
                         f"{row[what]:,} + {reserve} {row['reserve']:,}) of {row['available']:,} B: "
                         f"{-row['margin']:,} B over")
    return f"{fmt} does not fit {verdict['profile']} ({verdict['part']}): " + "; ".join(parts)


def profile_table() -> str:
    """The profiles as a text table (``featx-edge mcu --profile list``)."""
    lines = [(f"{'profile':<22} {'RAM':>9} {'flash':>9} {'reserve RAM':>11} {'reserve flash':>13}  {'npu':<14} "
              "part; source")]
    for p in PROFILES.values():
        lines.append(f"{p.name:<22} {_kib(p.ram_bytes):>9} {_kib(p.flash_bytes):>9} "
                     f"{_kib(p.runtime_reserve_bytes):>11} {_kib(p.code_reserve_bytes):>13}  {p.npu or '-':<14} "
                     f"{p.part}; {p.source}")
    lines.append("Fit: arena + RAM reserve <= RAM and model + flash reserve <= flash. The reserves are stated "
                 "estimates for the stack, RTOS and buffers (RAM) and the TFLM library and application (flash).")
    return "\n".join(lines)


def _kib(n: int) -> str:
    return f"{n / KIB:,.0f} KiB"
