#!/bin/sh
# Run by the postgres image once, when its volume is first created: MLflow's user and database beside Dagster's
# (POSTGRES_USER and POSTGRES_DB, which compose sets from DAGSTER_PG_USER and DAGSTER_PG_DB, are made by the image).
# Both come from MLFLOW_BACKEND_STORE_URI, postgresql://USER:PASSWORD@HOST:PORT/DB; a password must not need
# URL escaping here.
set -eu
rest=${MLFLOW_BACKEND_STORE_URI#*://}
credentials=${rest%%@*}
db=${rest##*/}
# psql quotes the variables (:"name" as an identifier, :'name' as a literal), so no value is spliced into SQL.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v user="${credentials%%:*}" -v password="${credentials#*:}" -v db="${db%%\?*}" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"user";
SQL
