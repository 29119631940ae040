"""Training data: where images come from (one module per source kind, listed in
``registry``) and how they become the one global sample stream (``stream``).

Kept empty on purpose: ``service.config`` imports ``service.data.registry`` to validate
``data.kind``, and a package ``__init__`` that pulled in the builders would import the config
back while it is still being defined.
"""
