"""Job side: launches torchrun agents locally, or watches a cluster-launched job."""
