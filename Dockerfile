# The Airflow image of docker-compose.yaml, with usage-agg installed as a provider, and its
# celery extra: the Celery provider and Celery at the versions the Celery system test runs.
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:root pyproject.toml README.md LICENSE /opt/usage-agg/
COPY --chown=airflow:root constraints /opt/usage-agg/constraints
COPY --chown=airflow:root plugins /opt/usage-agg/plugins
COPY --chown=airflow:root dags /opt/usage-agg/dags
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" \
        -c /opt/usage-agg/constraints/airflow-3.3.txt "/opt/usage-agg[celery]"
