"""The service's side of a conversion: job state (SQLAlchemy), the status reads, the Ray orchestrator, one job
as a Ray job, nightly schedules and the service loop that fires them."""
