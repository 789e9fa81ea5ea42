"""What assets and ops share with the wiring: settings, the MLflow and launcher resources, the
notifier and the model-logging helpers.

Kept import-free, and importing nothing from ``pipelines``, so that ``assets`` and ``ops`` can
import these modules while ``pipelines`` (the Definitions, jobs, schedules and sensors) imports
them all.
"""
