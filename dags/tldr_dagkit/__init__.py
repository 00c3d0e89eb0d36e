"""Builds the tldr-vlp Airflow DAGs from `tldr_tasks.pipeline.STAGES`.

Kept under dags/ (Airflow puts the dags folder on sys.path) so `tldr_tasks` itself never imports
Airflow. Listed in dags/.airflowignore: the dag-processor parses only tldr_compress.py and
tldr_ingest.py.
"""
