"""Worker side: runs under torchrun (or alone). Entry point: ``python -m service.train``."""
