-- Run once when the PostgreSQL volume is new: MLflow's store beside Dagster's (database `dagster`).
CREATE DATABASE mlflow;
