"""ftdiff: distributed, fault-tolerant training for diffusion models."""

__version__ = "0.1.0"
