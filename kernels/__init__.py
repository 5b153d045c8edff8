"""SEA attention kernels: Triton kernels beside their pure-PyTorch references.

`kernels.dispatch.ops(...)` picks the implementation; `kernels.reference` holds the
references every kernel is tested against. No service imports here (no Ray, FastAPI, s3fs).
"""
