"""The denoisers: one module per model family (listed in ``registry``), and what every family
shares — building from the config, the noise scheduler, the EMA (``build``, ``ema``).

Kept empty on purpose: ``service.config`` imports ``service.models.registry`` to validate
``model.family`` and ``model.preset``; an ``__init__`` that pulled in the builders (torch,
diffusers) would make every config read pay for them and import the config back mid-definition.
"""
