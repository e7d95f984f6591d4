"""facetier: layered, StyleGAN-prior re-encoding of face-photo archives."""
__version__ = "0.1.0"
