"""Wiring: the one Definitions object, jobs, schedules, sensors, the IO manager and the CLI.

Settings and resources live in ``resources`` so that assets and ops never import from here.
"""
