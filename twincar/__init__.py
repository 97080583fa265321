"""TwinCar: fine-grained car recognition (Stanford Cars) with timm, PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
