"""The Triton engine (``impl="triton"``): GPU kernels, the CPU through ``TRITON_INTERPRET=1``.

``engine`` has the interface the designs call (same as ``torch_engine.engine``); the
kernels are ``fwd`` (statistics), ``bwd`` (recomputed logit gradients), ``rows`` (the
forward-gradient row pass with the AGPO epilogue of ``epilogue``), on the logit tile of
``tile``, with the tile configurations of ``config``. Importing this package imports no
triton; its modules do, so the dispatcher imports them on demand. May import the shared
modules of ``agpo_kernels``, never the public layer or the dispatcher.
"""
