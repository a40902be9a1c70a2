#!/usr/bin/env bash
# Runs schemathesis against a live kiln-agent, both inside a private network
# namespace (the generated requests make real bridges; they vanish with it).
# Usage: schemathesis.sh AGENT_BINARY SCHEMATHESIS OPENAPI_JSON WORKDIR EXAMPLES
set -euo pipefail
agent=$1 st=$2 spec=$3 work=$4 examples=$5
ip link set lo up
dirs=(--data-dir "$work/data" --run-dir "$work/run" --pki-dir "$work/pki")
# A real software TPM for the node, on loopback in this namespace.
mkdir -p "$work/tpm"
swtpm socket --tpm2 --tpmstate dir="$work/tpm" --server type=tcp,port=2321,bindaddr=127.0.0.1 \
    --ctrl type=tcp,port=2322,bindaddr=127.0.0.1 --flags not-need-init,startup-clear \
    --log file="$work/swtpm.log" &
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/2322) 2>/dev/null && break; sleep 0.05; done
export KILN_TPM=swtpm:host=127.0.0.1,port=2321
token=$("$agent" "${dirs[@]}" init --name fuzz | sed -n '/^admin token/{n;p}')
"$agent" "${dirs[@]}" serve --listen 127.0.0.1:7443 >"$work/agent.log" 2>&1 &
agent_pid=$!
# The agent and the store daemon it started (which outlives it by design).
stop_all() {
    kill "$agent_pid" 2>/dev/null || true
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = "$$" ] && continue
        grep -qF "$work" "$p/cmdline" 2>/dev/null && kill -9 "${p#/proc/}" 2>/dev/null
    done
    return 0
}
trap stop_all EXIT
for _ in $(seq 100); do [[ -S $work/run/agent.sock ]] && break; sleep 0.1; done
cd "$work"
"$st" run "$spec" --url https://127.0.0.1:7443 \
    -H "Authorization: Bearer $token" --tls-verify "$work/pki/ca.crt" \
    --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
    --exclude-path-regex 'stream' --max-examples "$examples" --seed 1 -w 1 \
    --request-timeout 20 --warnings off --no-color
