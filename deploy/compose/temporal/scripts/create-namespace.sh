#!/bin/sh
# Waits for the Temporal server, then creates Tenure's namespace unless it exists.
# Retried as a whole: a server that has just become healthy may refuse for a moment.
set -eu

NAMESPACE="${DEFAULT_NAMESPACE:-default}"
RETENTION="${NAMESPACE_RETENTION:-72h}"
ADDRESS="${TEMPORAL_ADDRESS:-temporal:7233}"
ATTEMPTS="${ATTEMPTS:-60}"

attempt=1
while :; do
  if temporal operator cluster health --address "${ADDRESS}" >/dev/null 2>&1; then
    if temporal operator namespace describe --namespace "${NAMESPACE}" \
        --address "${ADDRESS}" >/dev/null 2>&1; then
      echo "namespace ${NAMESPACE} exists"
      exit 0
    fi
    if temporal operator namespace create --namespace "${NAMESPACE}" \
        --retention "${RETENTION}" --address "${ADDRESS}"; then
      echo "namespace ${NAMESPACE} created (retention ${RETENTION})"
      exit 0
    fi
  fi
  if [ "${attempt}" -ge "${ATTEMPTS}" ]; then
    echo "no namespace ${NAMESPACE} at ${ADDRESS} after ${ATTEMPTS} attempts" >&2
    exit 1
  fi
  attempt=$((attempt + 1))
  sleep 2
done
