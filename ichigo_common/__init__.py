"""What the producer and the workers share: settings, task names and payloads, the SQL store.

Nothing here imports torch, Celery or the pipeline.
"""
