#!/usr/bin/env bash
# make cluster-demo: a real two-node Ray cluster on this machine, one Ray job, checks, teardown.
#
#   bash cluster/demo.sh                      # from the repository root (it cd's there itself)
#   PY=/path/to/python bash cluster/demo.sh   # another interpreter with ray[default], torch, actorgrad deps
#
# 1. starts a head node (custom resource head_node=4) and a second node that joins it
#    (worker_node=4): two raylets, two object stores, one GCS and one dashboard;
# 2. submits cluster/placement_job.py as a Ray job: the job pins the worker `enc` to the head
#    node and `head` to the second node, trains 20 steps, prints
#    `PLACEMENT enc=<node id> head=<node id>` and `JOB OK`, and writes a checkpoint;
# 3. checks that the job SUCCEEDED, that enc and head ran on two different nodes (both being
#    nodes of this cluster), that the driver and a worker on each node imported actorgrad from
#    what the job shipped (not from this checkout), and that the checkpoint exists;
# 4. always stops the cluster (trap on EXIT).
#
# How the job gets actorgrad (SHIP):
#   SHIP=wheel (default; `make cluster-demo`) ships a built wheel: WHEEL (make cluster-demo
#     passes the one `make dist` built; otherwise this script builds one) goes in the job's
#     runtime env as `py_modules`, and the job's working dir holds placement_job.py alone.
#     Ray installs such a wheel on each node with `pip install --target`, which would install
#     every dependency again (torch, a second Ray: ray-project/ray#27624); the nodes run with
#     PIP_NO_DEPS=1 so that it installs actorgrad alone (see cluster/README.md, section 2).
#   SHIP=workdir, the alternative for development: `--working-dir .` uploads the repository
#     root, whose actorgrad/ is then imported everywhere; no build step.
#
# Teardown stops exactly the Ray processes this script started: each node is a
# `ray start --block` process in the background, and SIGTERM to it makes Ray kill the
# processes of that node (GCS, raylet, dashboard, its workers). It does not run
# `ray stop --force`, which kills every Ray process of every user on the machine (other
# test sessions, an embedded `ag.init()`); on a machine of your own, `ray stop --force` is
# the blunt fallback if something is left over. The cluster also gets a temp dir of its own,
# so that a plain `ray.init()` / `ag.init()` elsewhere on this machine does not join it.
#
# Environment: PY (default .venv/bin/python), RAY (default: the `ray` next to PY), SHIP and WHEEL (above),
# GCS_PORT (default 6390), DASHBOARD_PORT (default 8265), JOB_TIMEOUT (seconds, default 600),
# KEEP_LOGS=1 to keep the temp dir (node and job logs) after the demo.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
RAY=${RAY:-$(dirname "$PY")/ray}
JOB_TIMEOUT=${JOB_TIMEOUT:-600}
SHIP=${SHIP:-wheel}
WHEEL=${WHEEL:-}
REPO=$(pwd -P)
T0=$(date +%s)

say() { printf '[cluster-demo %3ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }

[ -x "$PY" ] || die "no Python interpreter at $PY (run 'make install' first, or set PY)"
[ -x "$RAY" ] || die "no ray CLI at $RAY (set RAY)"
case "$SHIP" in wheel|workdir) ;; *) die "SHIP must be wheel or workdir, not '$SHIP'" ;; esac
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || die "no wheel at WHEEL=$WHEEL (run 'make dist')"
# The job's entrypoint runs `python`: the nodes must find this interpreter first on PATH.
BIN_DIR=$(cd "$(dirname "$PY")" && pwd)
export PATH="$BIN_DIR:$PATH"
# Stop nodes at once on SIGTERM (no 30 s drain: nothing is serving traffic here).
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
export RAY_USAGE_STATS_ENABLED=0

port_is_free() {  # port_is_free PORT: can this machine bind PORT on 0.0.0.0 and 127.0.0.1?
    "$PY" - "$1" <<'EOF' 2>/dev/null
import socket, sys
for host in ("0.0.0.0", "127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, int(sys.argv[1])))
EOF
}
free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
pick_port() {  # pick_port PREFERRED: PREFERRED if free, else any free port
    if port_is_free "$1"; then echo "$1"; else free_port; fi
}

GCS_PORT=$(pick_port "${GCS_PORT:-6390}")
DASHBOARD_PORT=$(pick_port "${DASHBOARD_PORT:-8265}")
DASH_URL="http://127.0.0.1:$DASHBOARD_PORT"
WORK=$(mktemp -d /tmp/agdemo.XXXXXX)     # short: Ray's Unix socket paths live under it
HEAD_PID=""
NODE2_PID=""
# Ray 2.60 turns on token authentication when it finds a token (~/.ray/auth_token): give this
# cluster a token of its own, in its temp dir; every node, the job and the CLI calls below read it.
if [ -z "${RAY_AUTH_MODE:-}" ]; then
    (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$WORK/auth_token")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$WORK/auth_token"
fi

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    say "stopping the cluster (the two 'ray start --block' processes: ${NODE2_PID:-none} ${HEAD_PID:-none})"
    local pid
    for pid in $NODE2_PID $HEAD_PID; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for _ in $(seq 1 60); do
        local alive=0
        for pid in $NODE2_PID $HEAD_PID; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.5
    done
    for pid in $NODE2_PID $HEAD_PID; do
        if kill -0 "$pid" 2>/dev/null; then
            say "node process $pid did not stop in 30 s; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    wait 2>/dev/null || true
    if [ "${KEEP_LOGS:-0}" = 1 ] || [ "$rc" != 0 ]; then
        say "logs kept in $WORK (head.log, node2.log, job.log, head/session_latest/logs, node2/session_latest/logs)"
    else
        rm -rf "$WORK"
    fi
    if [ "$rc" = 0 ]; then say "cluster stopped; demo OK"; else say "cluster stopped; demo FAILED (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

alive_nodes() {  # how many ALIVE nodes the cluster's state API reports (0 while it is not up)
    "$PY" - "$DASH_URL" <<'EOF' 2>/dev/null || echo 0
import sys
from ray.util.state import list_nodes
print(len(list_nodes(address=sys.argv[1], filters=[("state", "=", "ALIVE")], timeout=5)))
EOF
}
wait_for_nodes() {  # wait_for_nodes N TIMEOUT
    local deadline=$(( $(date +%s) + $2 )) n=0
    while :; do
        n=$(alive_nodes)
        [ "$n" -ge "$1" ] && return 0
        for pid in $HEAD_PID $NODE2_PID; do
            kill -0 "$pid" 2>/dev/null || die "a node process ($pid) exited; see $WORK/head.log, $WORK/node2.log"
        done
        [ "$(date +%s)" -lt "$deadline" ] || die "only $n of $1 nodes alive after $2 s"
        sleep 1
    done
}

say "Ray $("$PY" -c 'import ray; print(ray.__version__)'), python $PY, temp dir $WORK, SHIP=$SHIP"
if [ "$SHIP" = wheel ]; then
    if [ -z "$WHEEL" ]; then
        say "building the wheel (python -m build --wheel)"
        "$PY" -m build --no-isolation --wheel --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 \
            || { tail -n 20 "$WORK/build.log" >&2; die "the wheel did not build; see $WORK/build.log"; }
        WHEEL=$(ls "$WORK"/dist/actorgrad-*.whl)
    fi
    WHEEL=$(cd "$(dirname "$WHEEL")" && pwd -P)/$(basename "$WHEEL")
    # The job's working dir: its script, and nothing of actorgrad's source.
    mkdir "$WORK/job"
    cp cluster/placement_job.py "$WORK/job/"
    say "shipping $(basename "$WHEEL") with the job (runtime env py_modules); working dir: placement_job.py alone"
    NODE_ENV=(env PIP_NO_DEPS=1)
    SUBMIT=(--working-dir "$WORK/job" --runtime-env-json "{\"py_modules\": [\"$WHEEL\"]}"
            -- python placement_job.py)
else
    say "shipping the repository root as the job's working dir"
    NODE_ENV=(env)
    EXCLUDES='[".venv", ".git", "docs", "*.egg-info", "__pycache__", ".pytest_cache", "dist", "build"]'
    SUBMIT=(--working-dir . --runtime-env-json "{\"excludes\": $EXCLUDES}" -- python cluster/placement_job.py)
fi
say "starting the head node: GCS 127.0.0.1:$GCS_PORT, dashboard $DASH_URL, resources CPU=1 head_node=4"
"${NODE_ENV[@]}" "$RAY" start --head --block \
    --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$(free_port)" --ray-client-server-port="$(free_port)" \
    --num-cpus=1 --resources='{"head_node": 4}' \
    --temp-dir="$WORK/head" --disable-usage-stats >"$WORK/head.log" 2>&1 &
HEAD_PID=$!
wait_for_nodes 1 120
say "head node up"

# The second node runs on the same machine: it needs a dashboard agent port and a temp dir of
# its own (as on a real second machine: two nodes sharing one runtime_resources directory race
# each other when they set up a job's runtime env).
say "starting a second node: joins 127.0.0.1:$GCS_PORT, resources CPU=1 worker_node=4"
"${NODE_ENV[@]}" "$RAY" start --block \
    --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 \
    --dashboard-agent-listen-port="$(free_port)" \
    --num-cpus=1 --resources='{"worker_node": 4}' \
    --temp-dir="$WORK/node2" --disable-usage-stats >"$WORK/node2.log" 2>&1 &
NODE2_PID=$!
wait_for_nodes 2 120
T_UP=$(date +%s)
say "cluster up: 2 nodes"
"$PY" - "$DASH_URL" <<'EOF' || true
import sys
from ray.util.state import list_nodes
for n in list_nodes(address=sys.argv[1], filters=[("state", "=", "ALIVE")], timeout=10, detail=True):
    res = ", ".join(f"{k}={v:g}" for k, v in sorted(n.resources_total.items()) if k in ("CPU", "head_node", "worker_node"))
    print(f"  node {n.node_id} {'head  ' if n.is_head_node else 'worker'} {n.node_ip}  {res}")
EOF

JOB_ID="actorgrad_demo_$(date +%Y%m%d_%H%M%S)_$$"
say "submitting job $JOB_ID: placement_job.py"
set +e
timeout "$JOB_TIMEOUT" "$RAY" job submit --address "$DASH_URL" --submission-id "$JOB_ID" \
    "${SUBMIT[@]}" --steps 20 --ckpt "$WORK/ckpt"
SUBMIT_RC=$?
set -e
T_JOB=$(date +%s)
say "ray job submit exited with $SUBMIT_RC after $(( T_JOB - T_UP )) s"
[ "$SUBMIT_RC" != 124 ] || { "$RAY" job stop --address "$DASH_URL" "$JOB_ID" >/dev/null 2>&1 || true; die "job did not finish in $JOB_TIMEOUT s"; }

STATUS=$("$PY" - "$DASH_URL" "$JOB_ID" <<'EOF' 2>&1 | tail -n 1
import sys
from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)
EOF
)
"$RAY" job logs --address "$DASH_URL" "$JOB_ID" >"$WORK/job.log" 2>&1 || true
say "job $JOB_ID status: $STATUS"
[ "$STATUS" = SUCCEEDED ] || { tail -n 40 "$WORK/job.log" >&2; die "job $JOB_ID did not succeed ($STATUS)"; }
[ "$SUBMIT_RC" = 0 ] || die "ray job submit exited with $SUBMIT_RC"

PLACEMENT=$(grep -E '^PLACEMENT enc=[0-9a-f]+ head=[0-9a-f]+$' "$WORK/job.log" | tail -n 1) \
    || die "no PLACEMENT line in the job's logs ($WORK/job.log)"
ENC_NODE=$(sed -E 's/^PLACEMENT enc=([0-9a-f]+) head=([0-9a-f]+)$/\1/' <<<"$PLACEMENT")
HEAD_NODE=$(sed -E 's/^PLACEMENT enc=([0-9a-f]+) head=([0-9a-f]+)$/\2/' <<<"$PLACEMENT")
[ "$ENC_NODE" != "$HEAD_NODE" ] || die "enc and head ran on the same node: $PLACEMENT"
NODES=$("$PY" - "$DASH_URL" <<'EOF'
import sys
from ray.util.state import list_nodes
for n in list_nodes(address=sys.argv[1], filters=[("state", "=", "ALIVE")], timeout=10):
    print(n.node_id, ",".join(sorted(k for k in n.resources_total if k in ("head_node", "worker_node"))))
EOF
)
grep -q "^$ENC_NODE head_node$" <<<"$NODES" || die "enc's node $ENC_NODE is not the head_node node: $NODES"
grep -q "^$HEAD_NODE worker_node$" <<<"$NODES" || die "head's node $HEAD_NODE is not the worker_node node: $NODES"
grep -q '^JOB OK$' "$WORK/job.log" || die "the job did not print JOB OK"
[ -f "$WORK/ckpt/LATEST" ] || [ -f "$WORK/ckpt/meta.msgpack" ] || die "no checkpoint at $WORK/ckpt"
# Where the driver and a Ray worker on each node imported actorgrad from: what the job shipped
# (Ray unpacks py_modules and working dirs under each node's runtime_resources/), never this checkout.
IMPORTS=$(grep -E 'imports actorgrad [^ ]+ from ' "$WORK/job.log" | sed -E 's/.* from //')
[ "$(wc -l <<<"$IMPORTS")" -ge 3 ] || die "expected 3 'imports actorgrad' lines in the job's logs: $IMPORTS"
SHIPPED=$([ "$SHIP" = wheel ] && echo py_modules_files || echo working_dir_files)
while read -r path; do
    case "$path" in
        "$REPO"/*) die "actorgrad was imported from this checkout ($path), not from what the job shipped" ;;
        */runtime_resources/"$SHIPPED"/*) ;;
        *) die "actorgrad was imported from $path, not from the job's $SHIPPED" ;;
    esac
done <<<"$IMPORTS"
WANT_VERSION=$("$PY" -c 'import runpy; print(runpy.run_path("actorgrad/_version.py")["__version__"])')
grep -qE "imports actorgrad $WANT_VERSION from " "$WORK/job.log" || die "the job did not import actorgrad $WANT_VERSION"

say "$PLACEMENT"
say "enc ran on the head_node node, head on the worker_node node: two distinct nodes"
say "$(grep -E '^LOSSES ' "$WORK/job.log" | awk '{print "loss " $2 " -> " $NF " over " NF-1 " steps"}')"
say "$(grep -E '^TIMINGS ' "$WORK/job.log")"
say "checkpoint: $(ls "$WORK/ckpt" | tr '\n' ' ')"
say "actorgrad $WANT_VERSION imported by the driver and on both nodes from the job's $SHIPPED ($SHIP)"
say "timings: cluster up $(( T_UP - T0 )) s, job $(( T_JOB - T_UP )) s, total so far $(( $(date +%s) - T0 )) s"
