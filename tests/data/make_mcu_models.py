"""Regenerate tests/data/mcu/unsupported_rfft2d.tflite: a 924-byte TFLite model whose one builtin
operator (RFFT2D) TensorFlow Lite Micro has no kernel for, for the test of the unsupported-op report.

    python tests/data/make_mcu_models.py
"""

from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).parent / "mcu" / "unsupported_rfft2d.tflite"


def main() -> None:
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8], tf.float32)])
    def spectrum(x):
        return tf.abs(tf.signal.rfft2d(x))

    converter = tf.lite.TFLiteConverter.from_concrete_functions([spectrum.get_concrete_function()], spectrum)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(converter.convert())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
