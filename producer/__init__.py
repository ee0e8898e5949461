"""The producer: validates submissions, records jobs and files in the store, and queues shards
of files for the workers by task name. Never imports torch, ``ichigo_pipeline`` or ``worker``.

- ``expand``: path checks against the allowed roots, lazy file discovery, sharding;
- ``queue``: the JSON-only Celery client, broker / worker probes, sending shards;
- ``enqueue``: ``submit_job`` (validate -> create -> expand -> send);
- ``jobstate``, ``views``: job-state transitions; what clients see of jobs and files;
- ``app``, ``deps``, ``schemas``, ``routes/``: the REST API;
- ``client``, ``cli``: ``ichigo submit | jobs | api``.
"""
