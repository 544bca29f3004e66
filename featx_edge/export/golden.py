"""The golden self-test files export writes next to each model (``RUN/export/selftest/``).

The images are the held-out test images the reference is surest about (largest top-1 margin),
saved as PNG at the model's input size; per model, the reference's and the exported model's own
probabilities on them. ``featx-edge selftest`` on a device compares against these.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featx_edge.data.folders import load_images
from featx_edge.fidelity.gate import broken_reference
from featx_edge.files.atomic import atomic_path
from featx_edge.rundir.names import EXPORT_DIR
from featx_edge.runtime.predictor import nonfinite_rows
from featx_edge.training.train import predict_probs


class GoldenImages:
    """The self-test images of one run, chosen and written once, on first use."""

    def __init__(self, run, *, count: int) -> None:
        self._run = run
        self._count = count
        self._chosen: tuple[list[str], np.ndarray, np.ndarray] | None = None

    def chosen(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(file names under selftest/, their pixels, the reference's probabilities)."""
        if self._chosen is None:
            from PIL import Image

            from featx_edge.runtime.selftest import SELFTEST_DIR

            run, splits = self._run, self._run.splits()
            # Probabilities streamed over the test split; only the chosen images are kept.
            probs = predict_probs(run.reference().model, splits.root, splits.test, size=run.size)
            bad = nonfinite_rows(probs)
            if bad:  # a broken reference: nothing exported from it can be right, nor a golden file of NaN
                raise broken_reference(run.path, weights=run.path / run.manifest["reference"]["path"], bad=bad,
                                       total=len(probs))
            top2 = np.sort(probs, axis=1)[:, -2:]
            chosen = np.argsort(-(top2[:, 1] - top2[:, 0]), kind="stable")[: min(self._count, len(probs))]
            pixels = load_images(splits.root, [splits.test[i] for i in chosen], size=run.size)
            names = []
            for i, image in enumerate(pixels):
                name = f"images/{i:02d}.png"
                with atomic_path(run.path / EXPORT_DIR / SELFTEST_DIR / name) as tmp:
                    Image.fromarray(image).save(tmp, format="PNG")
                names.append(name)
            self._chosen = (names, pixels, probs[chosen])
        return self._chosen

    def expected(self, path: Path) -> np.ndarray:
        """The model at ``path`` on the self-test images, on this host (raises if it cannot run here)."""
        from featx_edge.runtime import load

        _, pixels, _ = self.chosen()
        return load(path).predict_pixels(pixels, allow_nonfinite=True)

    def write(self, fmt: str, path: Path, *, expected: np.ndarray | None = None) -> None:
        """Write ``path``'s golden file: the reference's and this model's outputs (``expected``, computed
        now if not given) on the images."""
        from featx_edge.runtime.selftest import write_golden

        names, _, reference = self.chosen()
        write_golden(path, fmt=fmt, images=names, reference=reference,
                     expected=self.expected(path) if expected is None else expected)
