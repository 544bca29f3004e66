"""Firmware sources of `featx-edge mcu` (featx_edge.mcu.firmware): they compile, with the host's compiler
and with arm-none-eabi-gcc for a Cortex-M4, and the C array holds exactly the .tflite bytes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from featx_edge.mcu.firmware import FILES, write_firmware

MODEL = Path(__file__).parent / "data" / "runtime" / "model.tflite-int8.tflite"
INPUT = {"height": 32, "width": 32, "channels": 3, "layout": "NHWC", "color": "RGB", "value_range": [0, 255],
         "resize": "bilinear"}
LABELS = ["red", 'say "hi"', "back\\slash", "été ☃", "x??=y"]

CHECK_MAIN = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>
#include "model_data.h"
#include "model_settings.h"
#include "labels.h"

int main(int, char** argv) {
  if (reinterpret_cast<std::uintptr_t>(featx_model_data) % 16 != 0) return 3;
  std::FILE* out = std::fopen(argv[1], "wb");
  std::fwrite(featx_model_data, 1, featx_model_data_len, out);
  std::fclose(out);
  std::printf("%d %d %d %d %d\n", FEATX_INPUT_HEIGHT, FEATX_INPUT_WIDTH, FEATX_INPUT_CHANNELS, FEATX_CLASS_COUNT,
              FEATX_TENSOR_ARENA_SIZE);
  std::printf("%g %d %g %d %d %d\n", FEATX_INPUT_SCALE, FEATX_INPUT_ZERO_POINT, FEATX_OUTPUT_SCALE,
              FEATX_OUTPUT_ZERO_POINT, (int)sizeof(featx_input_t), (int)sizeof(featx_output_t));
  for (int i = 0; i < FEATX_CLASS_COUNT; ++i) std::printf("%s\n", featx_labels[i]);
  return 0;
}
"""


def _compile(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("firmware")
    files = write_firmware(folder, model=MODEL, fmt="tflite-int8", sha256="0" * 64, labels=LABELS, input_info=INPUT,
                           arena_bytes=8020)
    assert sorted(files) == sorted(FILES) and all(len(sha) == 64 for sha in files.values())
    return folder


def test_the_c_array_holds_exactly_the_tflite_bytes_compiled_by_the_host(sources, tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++): `apt-get install g++`")
    (tmp_path / "check.cc").write_text(CHECK_MAIN, encoding="utf-8")
    binary = tmp_path / "check"
    _compile([compiler, "-std=c++11", "-Wall", "-Wextra", "-Werror", "-I", str(sources),
              str(sources / "model_data.cc"), str(tmp_path / "check.cc"), "-o", str(binary)])
    proc = subprocess.run([str(binary), str(tmp_path / "bytes.bin")], capture_output=True, check=False)
    assert proc.returncode == 0, proc  # 3: the array is not 16-byte aligned
    assert (tmp_path / "bytes.bin").read_bytes() == MODEL.read_bytes()
    lines = proc.stdout.decode("utf-8").splitlines()
    assert lines[0] == f"32 32 3 {len(LABELS)} 8032"  # the measured 8020 rounded up to 16 bytes
    assert lines[1] == "1 0 0.00390625 0 1 1"  # uint8 in and out, as the model's tensors say
    assert lines[2:] == LABELS  # quotes, backslashes, UTF-8 and trigraph-like text survive


def test_the_sources_compile_for_a_cortex_m4(sources, tmp_path):
    gcc = shutil.which("arm-none-eabi-gcc")
    if gcc is None:
        pytest.skip("arm-none-eabi-gcc is not installed (`apt-get install gcc-arm-none-eabi`; .ci/run installs it)")
    (tmp_path / "use.cc").write_text('#include "model_data.h"\n#include "model_settings.h"\n#include "labels.h"\n'
                                     "alignas(16) unsigned char arena[FEATX_TENSOR_ARENA_SIZE];\n"
                                     "const char* first_label() { return featx_labels[0]; }\n"
                                     "unsigned model_size() { return featx_model_data_len + arena[0]; }\n",
                                     encoding="utf-8")
    for source in (sources / "model_data.cc", tmp_path / "use.cc"):
        _compile([gcc, "-mcpu=cortex-m4", "-mthumb", "-Os", "-Wall", "-Wextra", "-Werror", "-ffreestanding",
                  "-I", str(sources), "-c", str(source), "-o", str(tmp_path / (source.stem + ".o"))])
    nm = shutil.which("arm-none-eabi-nm")
    if nm:
        symbols = subprocess.run([nm, "-S", str(tmp_path / "model_data.o")], capture_output=True, text=True,
                                 check=True).stdout
        sizes = {line.split()[-1]: int(line.split()[1], 16) for line in symbols.splitlines() if len(line.split()) == 4}
        assert sizes["featx_model_data"] == MODEL.stat().st_size and sizes["featx_model_data_len"] == 4


def test_model_settings_say_the_preprocessing_and_the_measured_arena(sources):
    settings = (sources / "model_settings.h").read_text(encoding="ascii")
    assert "RGB pixels 0..255, resized (bilinear) to 32x32" in settings and "the model scales them itself" in settings
    assert "measured 8020 bytes" in settings and "#define FEATX_TENSOR_ARENA_SIZE 8032" in settings
    header = (sources / "model_data.h").read_text(encoding="ascii")
    assert "extern const unsigned char featx_model_data[];" in header
    assert "extern const unsigned int featx_model_data_len;" in header
    assert "alignas(16) const unsigned char featx_model_data[]" in (sources / "model_data.cc").read_text("ascii")


def test_the_readme_shows_the_application_example_the_bundle_ships():
    from featx_edge.mcu.firmware import APPLICATION_EXAMPLE

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"```c++\n{APPLICATION_EXAMPLE}```" in readme


def test_model_settings_name_the_operators_to_register(sources):
    settings = (sources / "model_settings.h").read_text(encoding="ascii")
    line = next(line for line in settings.splitlines() if line.startswith("#define FEATX_OPERATORS"))
    assert "CONV_2D" in line and "FULLY_CONNECTED" in line and "SOFTMAX" in line, line
