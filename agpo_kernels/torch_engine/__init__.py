"""The tiled pure-PyTorch engine (``impl="torch"``): runs anywhere, the CPU included.

``engine`` has the interface the designs call (``logits``, ``partials``, ``grads``,
``loss_chunk``, ``bytes_per_row``); ``rows`` the row passes over a chunk's logits.
May import the shared modules of ``agpo_kernels`` (``inputs``, ``chunks``, ``partials``,
``precision``, ``epilogue``), never the public layer or the dispatcher.
"""
