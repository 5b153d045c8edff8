"""The jobs around the SEA code, by concern; imports run service -> pipeline -> train -> sea_convert.

- service/: the conversion service's side: job state in a database, the reads behind the REST status
  calls, the Ray head and job submission, one job as a Ray job, nightly schedules, the service loop.
- pipeline/: one conversion as stages that hand over through files (distill -> validate -> publish), each
  a plain function that runs without Ray; the object storage it publishes to; where a job's files live.
- train/: parallel stage A: the worker body (a plain function of a JSON config), its launchers (Ray Train,
  torchrun), FSDP2 sharding applied from outside the model code, sharded loading, distributed checkpoints.
"""
