"""The SQL store (SQLAlchemy 2.x): jobs, files, transcripts. The system of record."""
