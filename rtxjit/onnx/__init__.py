"""ONNX front end: the importer and the onnx.backend adapter."""
