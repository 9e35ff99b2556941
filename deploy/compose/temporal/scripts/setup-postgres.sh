#!/bin/sh
# Creates (when missing) and migrates Temporal's two PostgreSQL databases: the default
# store and the visibility store. Every step is idempotent, so this runs on every `up`,
# and a newer admin-tools image brings the schema up to its server version.
set -eu

: "${POSTGRES_SEEDS:?POSTGRES_SEEDS is required}"
: "${POSTGRES_USER:?POSTGRES_USER is required}"
: "${SQL_PASSWORD:?SQL_PASSWORD is required}"
PORT="${DB_PORT:-5432}"
SCHEMA=/etc/temporal/schema/postgresql/v12

echo "waiting for PostgreSQL at ${POSTGRES_SEEDS}:${PORT}"
until nc -z -w 5 "${POSTGRES_SEEDS}" "${PORT}"; do sleep 1; done

sql() {
  temporal-sql-tool --plugin postgres12 --ep "${POSTGRES_SEEDS}" -u "${POSTGRES_USER}" \
    -p "${PORT}" "$@"
}

for store in temporal:temporal temporal_visibility:visibility; do
  db="${store%%:*}"
  dir="${store##*:}"
  echo "database ${db}: create, setup, update"
  sql --db "${db}" create
  sql --db "${db}" setup-schema -v 0.0
  sql --db "${db}" update-schema -d "${SCHEMA}/${dir}/versioned"
done

echo "Temporal schema is up to date"
