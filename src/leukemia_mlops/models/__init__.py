"""Models: torchvision CNN classifiers and YOLOv3."""
