-- MLflow's backend store beside Dagster's database (POSTGRES_DB), run once by the postgres image.
CREATE DATABASE mlflow;
