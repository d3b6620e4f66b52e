#!/bin/bash
# A throw-away single-node SLURM cluster on this machine, for testing the sbatch scripts for
# real (`make test-slurm`). Debian/Ubuntu, run as root. SLURM's packages (slurmctld, slurmd,
# slurm-client, munge) are installed with apt when missing, without starting their services.
# No cgroups (task/none, proctrack/linuxproc) and no accounting; all SLURM state, logs and
# the config live in $SLURM_DIR. The daemons run in the foreground as children of this
# script's subshells, and `stop` ends exactly the PIDs `start` recorded.
#
#   launch/local_slurm.sh start    # install if needed, configure, start, wait until the node is idle
#   export SLURM_CONF=$SLURM_DIR/slurm.conf   # then sbatch / squeue / scontrol as on any cluster
#   launch/local_slurm.sh stop     # stop the recorded daemons (TERM, then KILL after 5 s)
#
# Environment: SLURM_DIR (/tmp/raptor-slurm), SLURM_CPUS (CPUs of this machine),
# SLURM_MEM_MB (4000), SLURM_PORT (6817: slurmctld; slurmd uses the next port).
# The munge key is the system's (/etc/munge/munge.key); one is generated when missing.
set -euo pipefail

dir=${SLURM_DIR:-/tmp/raptor-slurm}
cpus=${SLURM_CPUS:-$(nproc)}
mem_mb=${SLURM_MEM_MB:-4000}
port=${SLURM_PORT:-6817}
pids=$dir/pids

# A recorded "name pid" line is still ours when that PID runs the program of that name.
ours() { [ "$(cat "/proc/$2/comm" 2> /dev/null)" = "$1" ]; }

stop() {
    [ -f "$pids" ] || { echo "local_slurm: nothing to stop ($pids absent)"; return 0; }
    local name pid _
    # reverse start order: slurmd, slurmctld, munged
    while read -r name pid; do
        if ours "$name" "$pid"; then kill "$pid" && echo "local_slurm: stopped $name ($pid)"; fi
    done < <(tac "$pids")
    for _ in $(seq 50); do
        local left=0
        while read -r name pid; do ours "$name" "$pid" && left=1; done < "$pids"
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    while read -r name pid; do
        if ours "$name" "$pid"; then kill -9 "$pid" && echo "local_slurm: killed $name ($pid)"; fi
    done < "$pids"
    rm -f "$pids"
}

install() {
    local missing=0 prog
    for prog in slurmctld slurmd sbatch munged; do
        command -v "$prog" > /dev/null || [ -x "/usr/sbin/$prog" ] || missing=1
    done
    [ "$missing" = 0 ] && return 0
    echo "local_slurm: installing slurmctld slurmd slurm-client munge with apt"
    # Without an init system, services must not be started by the packages' scripts:
    # policy-rc.d exiting 101 tells invoke-rc.d "not allowed".
    local policy=/usr/sbin/policy-rc.d made=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made=1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge
    [ "$made" = 1 ] && rm -f "$policy"
    return 0
}

munge_setup() {
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    [ -s /etc/munge/munge.key ] || head -c 1024 /dev/urandom > /etc/munge/munge.key
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    chmod 755 /run/munge
}

write_conf() {
    cat > "$dir/slurm.conf" << EOF
# written by launch/local_slurm.sh: one node (this machine), no cgroups, no accounting
ClusterName=raptortest
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=3600
KillWait=10
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    if [ -f "$pids" ]; then
        echo "local_slurm: $pids exists: already started? run '$0 stop' first" >&2
        exit 1
    fi
    [ "$(id -u)" = 0 ] || { echo "local_slurm: run as root (apt, munge, slurmd)" >&2; exit 1; }
    install
    munge_setup
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    write_conf
    export SLURM_CONF=$dir/slurm.conf
    : > "$pids"

    setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground \
        > "$dir/log/munged.out" 2>&1 &
    echo "munged $!" >> "$pids"
    local _
    for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
    munge -n | unmunge > /dev/null || { echo "local_slurm: munge does not work" >&2; exit 1; }

    /usr/sbin/slurmctld -D -i -f "$SLURM_CONF" > "$dir/log/slurmctld.out" 2>&1 &
    echo "slurmctld $!" >> "$pids"
    for _ in $(seq 100); do scontrol ping > /dev/null 2>&1 && break; sleep 0.2; done
    /usr/sbin/slurmd -D -N localhost -f "$SLURM_CONF" > "$dir/log/slurmd.out" 2>&1 &
    echo "slurmd $!" >> "$pids"

    local state=""
    for _ in $(seq 60); do
        state=$(sinfo -h -n localhost -o %t 2> /dev/null || true)
        [ "$state" = idle ] && break
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        echo "local_slurm: node state '$state', not idle; logs in $dir/log" >&2
        exit 1
    fi
    echo "local_slurm: up ($cpus CPUs, state in $dir); export SLURM_CONF=$SLURM_CONF"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *)
        echo "usage: [SLURM_DIR=..] $0 start|stop" >&2
        exit 2
        ;;
esac
