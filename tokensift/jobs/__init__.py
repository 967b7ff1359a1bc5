"""Ray Jobs API submission, local head start/stop, job status."""
