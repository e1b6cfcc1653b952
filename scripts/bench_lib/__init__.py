"""The pieces of ``scripts/bench``: child processes, receivers, workloads, measurement, report."""
