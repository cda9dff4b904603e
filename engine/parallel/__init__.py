"""Tensor parallelism within an instance (``--tp-size``): the ranks' process group and how a
model splits over it (``group``), the Megatron-style layers (``layers``), the step frames rank 0
relays to the other ranks and the other ranks' process (``steps``)."""
