"""Wiring: the one Definitions object, resources, jobs, schedules, sensors and the CLI.

Kept import-free so that ``assets`` can import ``pipelines.resources`` without a cycle.
"""
