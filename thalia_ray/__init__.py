"""thalia-ray: distributed training on Ray for the Thalia InSAR volcanic-deformation benchmark."""

__version__ = "0.1.0"
