"""One conversion job as stages that hand over through files: distill -> validate -> publish (`stages.py`),
each a plain function that runs without Ray; the storage it publishes to; where a job's files live."""
