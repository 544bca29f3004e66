"""Child process of ``featx_edge.mcu.tflm``: one model through TensorFlow Lite Micro on a file of pixels.

    python -m featx_edge.mcu.tflm_worker MODEL.tflite PIXELS.npy OUT.npy

PIXELS.npy holds uint8 (N, H, W, 3) pixels; OUT.npy receives float32 (N, classes) probabilities,
quantized and dequantized as the device runtime does (``runtime.backends``). After the first image
the recording allocator's report goes to stderr (TFLM prints it from C++), where the parent reads
the arena size. TFLM runs in a child because its C++ code prints to the process's stderr and a
kernel can stop the whole process on parameters it does not support.
"""

from __future__ import annotations

import sys

import numpy as np

from featx_edge.runtime.backends import _dequantize, _quantize

EXIT_NOT_LOADED = 3
"""Exit status when TFLM cannot prepare the model (an operator without a kernel, an arena too small)."""


def _quantization(details: dict) -> tuple[float, int]:
    params = details["quantization_parameters"]
    scales, zero_points = params["scales"], params["zero_points"]
    return (float(scales[0]), int(zero_points[0])) if len(scales) else (0.0, 0)


def run(model: str, pixels: np.ndarray, *, arena_size: int) -> np.ndarray:
    """Probabilities of ``model`` on ``pixels`` (one image per invoke, as on the device)."""
    from tflite_micro import runtime

    try:
        interpreter = runtime.Interpreter.from_file(model, arena_size=arena_size)
    except (RuntimeError, ValueError) as err:
        print(f"featx-edge: TFLM could not prepare the model: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_NOT_LOADED)
    into, out = interpreter.get_input_details(0), interpreter.get_output_details(0)
    in_dtype, out_dtype = np.dtype(into["dtype"]), np.dtype(out["dtype"])
    in_scale, in_zero = _quantization(into)
    out_scale, out_zero = _quantization(out)
    outputs = []
    for i in range(max(len(pixels), 1)):  # no images: one blank image, for the arena figure alone
        x = pixels[i : i + 1] if len(pixels) else np.zeros(tuple(into["shape"]), np.uint8)
        x = x.astype(np.float32) if in_dtype == np.float32 else _quantize(x, in_dtype, in_scale, in_zero)
        interpreter.set_input(x, 0)
        interpreter.invoke()
        y = interpreter.get_output(0)
        y = y if out_dtype == np.float32 else _dequantize(y, out_scale, out_zero)
        outputs.append(np.asarray(y, np.float32).reshape(1, -1))
        if i == 0:
            sys.stderr.flush()
            interpreter.print_allocations()  # C++ writes to fd 2: the parent reads the arena from it
    return np.concatenate(outputs)[: len(pixels)]


def main(argv: list[str]) -> int:
    model, pixels_path, out_path, arena_size = argv[0], argv[1], argv[2], int(argv[3])
    pixels = np.load(pixels_path, mmap_mode="r", allow_pickle=False)
    probs = run(model, pixels, arena_size=arena_size)
    with open(out_path, "wb") as fh:
        np.save(fh, probs, allow_pickle=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
