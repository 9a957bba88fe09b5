"""BrainVQ: a VQ-VAE and a gated PixelCNN prior for brain MRI slices."""
__version__ = "0.1.0"
