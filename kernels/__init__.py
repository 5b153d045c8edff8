"""SEA attention kernels: Triton kernels beside their pure-PyTorch references.

`kernels.dispatch.ops(...)` picks the implementation; `kernels.reference` gathers the
references every kernel is tested against (kernels/reference_*.py, each beside its kernel).
No service imports here (no Ray, FastAPI, s3fs); nothing here imports sea_convert.
"""
