"""Inference: scorers over any model source, batch prediction of image files, ONNX export."""
