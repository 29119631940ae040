"""Per-node process plumbing, apart from the worker: the torchrun agent wrapper (``agent``),
the warm process and its shim (``zygote``, ``shim``), the stuck-worker watch of attach mode
(``stuck_watch``), the patches of torch's agent internals (``torch_patches``), /proc helpers
(``proc``) and how processes leave (``exits``: parent-death signal, orphan and restart exits).

Light on purpose (the shim imports this package and must not import torch).
"""
