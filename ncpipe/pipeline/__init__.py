"""Job execution: shard workers, Ray actors, distribution, job drivers."""
