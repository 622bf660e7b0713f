#!/usr/bin/env bash
# A two-node SLURM on localhost, for tests/test_cluster.py (as root, as on CI):
#
#   tests/cluster/slurm.sh start DIR   # install if needed, write DIR/slurm.conf, start daemons
#   tests/cluster/slurm.sh stop DIR    # stop them by their PIDs, undo the /etc/hosts entry
#
# Clients then need SLURM_CONF=DIR/slurm.conf. Debian's SLURM: munged, slurmctld and two
# slurmd (nodes n1 and n2, built with MULTIPLE_SLURMD) on one host, no cgroups (containers
# have none: proctrack/linuxproc, task/none), requeued jobs start again within seconds.
# Every PID started is written to DIR/pids before anything else can fail, so `stop`
# always finds them; `start` stops what it started when it fails.
set -Eeuo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(realpath -m "$2")
HOSTS_MARK="# fromage test-cluster"
CTLD_PORT=${FROMAGE_SLURMCTLD_PORT:-16817}
NODE_PORTS=(${FROMAGE_SLURMD_PORTS:-16818 16819})

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=fromage-ci
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# short-lived credentials and a fast scheduler: a requeued job runs again in ~15 s, not ~2 min
AuthInfo=cred_expire=10
SchedulerParameters=bf_interval=2,sched_interval=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
# no cgroups in a container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=5
NodeName=n1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=${NODE_PORTS[0]} CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=${NODE_PORTS[1]} CPUs=2 State=UNKNOWN
PartitionName=ci Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

# Run "$@" in the background and record its PID in DIR/pids under NAME.
spawn() {
    local name=$1
    shift
    "$@" >>"$dir/log/$name.out" 2>&1 &
    echo "$name $!" >>"$dir/pids"
}

start() {
    install
    write_conf
    : >"$dir/pids"
    trap 'echo "start failed: stopping what was started" >&2; stop' ERR
    # Lightning takes the first node of SLURM_NODELIST as the master address: n1 must resolve.
    grep -q "$HOSTS_MARK" /etc/hosts || echo "127.0.0.1 n1 n2 $HOSTS_MARK" >>/etc/hosts
    mkdir -p /run/munge
    chown munge:munge /run/munge
    # setpriv execs munged in place, so $! is munged's own PID
    spawn munged setpriv --reuid=munge --regid=munge --init-groups munged -F
    wait_for "munge" bash -c 'munge -n | unmunge >/dev/null'
    export SLURM_CONF=$dir/slurm.conf
    spawn slurmctld slurmctld -D -f "$SLURM_CONF"
    wait_for "slurmctld" scontrol ping
    for node in n1 n2; do
        spawn "slurmd-$node" slurmd -D -N "$node" -f "$SLURM_CONF"
    done
    wait_for "two idle nodes" bash -c '[ "$(sinfo -h -N -t idle -o %N | sort -u | wc -l)" -eq 2 ]'
    trap - ERR
    sinfo -N
}

# wait_for WHAT COMMAND...: retry COMMAND for up to 60 s.
wait_for() {
    local what=$1
    shift
    for _ in $(seq 120); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "timed out waiting for $what; logs in $dir/log" >&2
    return 1
}

stop() {
    if [ -f "$dir/pids" ]; then
        # daemons in reverse order of start; each by its PID, SIGKILL if it outlives 10 s
        tac "$dir/pids" | while read -r name pid; do
            kill "$pid" 2>/dev/null || continue
            for _ in $(seq 20); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.5
            done
            kill -0 "$pid" 2>/dev/null && { echo "killing $name ($pid)" >&2; kill -9 "$pid"; }
            true
        done
        rm -f "$dir/pids"
    fi
    # rewritten in place, not replaced: /etc/hosts is often a bind mount
    local kept
    kept=$(grep -v "$HOSTS_MARK" /etc/hosts || true)
    printf '%s\n' "$kept" >/etc/hosts
}

case $action in
start) start ;;
stop) stop ;;
*) usage ;;
esac
