"""Firmware sources for a TensorFlow Lite Micro application: the model as a C array, its settings, its labels.

``RUN/export/mcu/<format>/`` receives:

- ``model_data.h`` / ``model_data.cc``: ``extern const unsigned char featx_model_data[]`` (16-byte
  aligned, as TFLM requires of a flatbuffer it reads in place) holding exactly the ``.tflite``
  bytes, and ``extern const unsigned int featx_model_data_len``;
- ``model_settings.h``: input height, width and channels, the input tensor's type, scale and zero
  point, the preprocessing the application must do (the rest is in the model), the output's
  scale and zero point, the class count and the tensor arena to allocate (TFLM's recording
  allocator figure, rounded up to 16 bytes);
- ``labels.h``: the class names, in output order.

Every file is plain C (``model_data.cc`` is C++, as TFLM applications are) and compiles with
``arm-none-eabi-gcc -mcpu=cortex-m4``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featx_edge.export.tflite import op_types
from featx_edge.files.atomic import sha256_file, write_bytes

FILES = ("model_data.h", "model_data.cc", "model_settings.h", "labels.h")
ALIGNMENT = 16
APPLICATION_EXAMPLE = """\
#include <math.h>
#include "model_data.h"
#include "model_settings.h"
#include "labels.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

alignas(16) static uint8_t tensor_arena[FEATX_TENSOR_ARENA_SIZE];
static tflite::MicroMutableOpResolver<16> resolver;
static tflite::MicroInterpreter* interpreter = nullptr;

bool featx_setup() {  // once, at start-up
  // The operators model_settings.h lists (FEATX_OPERATORS); those of the demo's Lite0 int8 export:
  resolver.AddQuantize(); resolver.AddConv2D(); resolver.AddDepthwiseConv2D(); resolver.AddAdd();
  resolver.AddMean(); resolver.AddFullyConnected(); resolver.AddSoftmax();
  static tflite::MicroInterpreter instance(tflite::GetModel(featx_model_data), resolver, tensor_arena,
                                           FEATX_TENSOR_ARENA_SIZE);
  interpreter = &instance;
  return interpreter->AllocateTensors() == kTfLiteOk;
}

int featx_classify(const uint8_t* rgb) {  // FEATX_INPUT_HEIGHT x FEATX_INPUT_WIDTH x 3, RGB 0..255, resized
  featx_input_t* in = tflite::GetTensorData<featx_input_t>(interpreter->input(0));
  for (int i = 0; i < FEATX_INPUT_HEIGHT * FEATX_INPUT_WIDTH * FEATX_INPUT_CHANNELS; ++i)
    in[i] = (featx_input_t)lroundf(rgb[i] / FEATX_INPUT_SCALE + FEATX_INPUT_ZERO_POINT);
  if (interpreter->Invoke() != kTfLiteOk) return -1;
  const featx_output_t* scores = tflite::GetTensorData<featx_output_t>(interpreter->output(0));
  int best = 0;
  for (int c = 1; c < FEATX_CLASS_COUNT; ++c) if (scores[c] > scores[best]) best = c;
  return best;  // featx_labels[best]; its probability: (scores[best] - FEATX_OUTPUT_ZERO_POINT) * FEATX_OUTPUT_SCALE
}
"""
"""How a TFLM application uses the sources (the README and the firmware bundle's README show it)."""
_BYTES_PER_LINE = 12


def arena_to_allocate(arena_bytes: int) -> int:
    """The measured arena rounded up to the alignment the application declares it with."""
    return -(-arena_bytes // ALIGNMENT) * ALIGNMENT


def write_firmware(folder: Path, *, model: Path, fmt: str, sha256: str, labels: list[str], input_info: dict,
                   arena_bytes: int) -> dict[str, str]:
    """Write the four sources of ``model`` into ``folder``; returns each file's sha256 by name."""
    data = model.read_bytes()
    io = tensor_io(data)
    operators = op_types(data)
    origin = f"featx-edge {fmt} export `{model.name}` (sha256 {sha256})"
    texts = {"model_data.h": _model_header(origin),
             "model_data.cc": _model_source(origin, data),
             "model_settings.h": _settings(origin, io=io, input_info=input_info, classes=len(labels),
                                           arena=arena_to_allocate(arena_bytes), measured=arena_bytes,
                                           operators=operators),
             "labels.h": _labels(origin, labels)}
    folder.mkdir(parents=True, exist_ok=True)
    return {name: sha256_file(write_bytes(folder / name, texts[name].encode("ascii"))) for name in FILES}


def tensor_io(flatbuffer: bytes) -> dict:
    """The input and output tensors' type, scale and zero point (read with LiteRT, not run)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)

    def describe(details: dict) -> dict:
        scale, zero_point = details["quantization"]
        return {"dtype": np.dtype(details["dtype"]).name, "scale": float(scale), "zero_point": int(zero_point)}

    return {"input": describe(interpreter.get_input_details()[0]),
            "output": describe(interpreter.get_output_details()[0])}


def _guard(name: str) -> str:
    return "FEATX_" + name.upper().replace(".", "_") + "_"


def _model_header(origin: str) -> str:
    return f"""// Generated by {origin}. Do not edit.
#ifndef {_guard('model_data.h')}
#define {_guard('model_data.h')}

// The .tflite flatbuffer, byte for byte, aligned to {ALIGNMENT} bytes (TFLM reads it in place).
extern const unsigned char featx_model_data[];
extern const unsigned int featx_model_data_len;

#endif  // {_guard('model_data.h')}
"""


def _model_source(origin: str, data: bytes) -> str:
    rows = (", ".join(f"0x{b:02x}" for b in data[i : i + _BYTES_PER_LINE])
            for i in range(0, len(data), _BYTES_PER_LINE))
    body = ",\n  ".join(rows)
    return f"""// Generated by {origin}. Do not edit.
#include "model_data.h"

alignas({ALIGNMENT}) const unsigned char featx_model_data[] = {{
  {body}
}};
const unsigned int featx_model_data_len = {len(data)};
"""


def _settings(origin: str, *, io: dict, input_info: dict, classes: int, arena: int, measured: int,
              operators: list[str]) -> str:
    inp, out = io["input"], io["output"]
    c_types = {"uint8": "uint8_t", "int8": "int8_t", "float32": "float"}
    c_type, out_type = c_types.get(inp["dtype"], "uint8_t"), c_types.get(out["dtype"], "uint8_t")
    low, high = (input_info.get("value_range") or [0, 255])[:2]
    resize = input_info.get("resize", "bilinear")
    preprocessing = (f"{input_info.get('color', 'RGB')} pixels {low}..{high}, resized ({resize}) "
                     f"to {input_info['height']}x{input_info['width']}, {input_info.get('layout', 'NHWC')}; "
                     "the model scales them itself")
    return f"""// Generated by {origin}. Do not edit.
#ifndef {_guard('model_settings.h')}
#define {_guard('model_settings.h')}

#include <stdint.h>

#define FEATX_INPUT_HEIGHT {int(input_info['height'])}
#define FEATX_INPUT_WIDTH {int(input_info['width'])}
#define FEATX_INPUT_CHANNELS {int(input_info.get('channels', 3))}
// Preprocessing the application does: {preprocessing}.
// Each pixel value p goes into the input tensor as round(p / FEATX_INPUT_SCALE) + FEATX_INPUT_ZERO_POINT.
#define FEATX_PREPROCESSING "{_c_text(preprocessing)}"
typedef {c_type} featx_input_t;
typedef {out_type} featx_output_t;
#define FEATX_INPUT_SCALE {inp['scale']!r}f
#define FEATX_INPUT_ZERO_POINT {inp['zero_point']}
// Class probability = (output value - FEATX_OUTPUT_ZERO_POINT) * FEATX_OUTPUT_SCALE.
#define FEATX_OUTPUT_SCALE {out['scale']!r}f
#define FEATX_OUTPUT_ZERO_POINT {out['zero_point']}
#define FEATX_CLASS_COUNT {classes}
// TFLM's recording allocator measured {measured} bytes; declare the arena alignas({ALIGNMENT}).
#define FEATX_TENSOR_ARENA_SIZE {arena}
// The operators the application's op resolver must register (TFLite builtin names).
#define FEATX_OPERATORS "{_c_text(", ".join(operators))}"

#endif  // {_guard('model_settings.h')}
"""


def _labels(origin: str, labels: list[str]) -> str:
    names = ",\n  ".join(f'"{_c_text(label)}"' for label in labels)
    return f"""// Generated by {origin}. Do not edit.
#ifndef {_guard('labels.h')}
#define {_guard('labels.h')}

// Class names in the order of the model's outputs (UTF-8).
static const char* const featx_labels[{len(labels)}] = {{
  {names}
}};

#endif  // {_guard('labels.h')}
"""


def _c_text(text: str) -> str:
    """``text`` as the inside of a C string literal: printable ASCII kept, everything else as octal
    escapes of its UTF-8 bytes (octal, not hex: a hex escape would swallow a following digit)."""
    out = []
    for byte in str(text).encode("utf-8"):
        char = chr(byte)
        out.append(char if 0x20 <= byte < 0x7F and char not in '"\\?' else f"\\{byte:03o}")
    return "".join(out)
