#!/bin/sh
# Waits for the Temporal server, then creates Tenure's namespace unless it exists, and the
# search attributes Tenure's workflows set unless they exist.
# Retried as a whole: a server that has just become healthy may refuse for a moment.
set -eu

NAMESPACE="${DEFAULT_NAMESPACE:-default}"
RETENTION="${NAMESPACE_RETENTION:-72h}"
ADDRESS="${TEMPORAL_ADDRESS:-temporal:7233}"
ATTEMPTS="${ATTEMPTS:-60}"
# Name=Type, as deploy/embedded.py registers them on the dev server.
SEARCH_ATTRIBUTES="TenureCheckoutStatus=Keyword"

namespace() {
  if temporal operator namespace describe --namespace "${NAMESPACE}" \
      --address "${ADDRESS}" >/dev/null 2>&1; then
    echo "namespace ${NAMESPACE} exists"
    return 0
  fi
  temporal operator namespace create --namespace "${NAMESPACE}" \
    --retention "${RETENTION}" --address "${ADDRESS}" &&
    echo "namespace ${NAMESPACE} created (retention ${RETENTION})"
}

search_attributes() {
  for attribute in ${SEARCH_ATTRIBUTES}; do
    name="${attribute%%=*}"
    if temporal operator search-attribute list --namespace "${NAMESPACE}" \
        --address "${ADDRESS}" 2>/dev/null | grep -qw "${name}"; then
      echo "search attribute ${name} exists"
      continue
    fi
    temporal operator search-attribute create --namespace "${NAMESPACE}" \
      --name "${name}" --type "${attribute#*=}" --address "${ADDRESS}" || return 1
    echo "search attribute ${name} created"
  done
}

attempt=1
while :; do
  if temporal operator cluster health --address "${ADDRESS}" >/dev/null 2>&1; then
    if namespace && search_attributes; then
      exit 0
    fi
  fi
  if [ "${attempt}" -ge "${ATTEMPTS}" ]; then
    echo "no namespace ${NAMESPACE} or search attributes at ${ADDRESS} after ${ATTEMPTS} attempts" >&2
    exit 1
  fi
  attempt=$((attempt + 1))
  sleep 2
done
