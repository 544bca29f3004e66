"""Export a trained run to TFLite and ONNX formats (see ``featx_edge.export.pipeline``)."""
