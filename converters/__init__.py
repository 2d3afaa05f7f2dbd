"""edgeopt.converters: passes (ONNX → ONNX), targets (ONNX → artifact), the pipeline, validation."""
