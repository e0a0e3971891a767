#!/usr/bin/env bash
# A real, single-host SLURM for tests and CI (Debian's slurm-wlm + munge), not a mock.
#   scripts/slurm/local-slurm.sh start   install if missing, configure, start munged/slurmctld/slurmd; idempotent
#   scripts/slurm/local-slurm.sh stop    stop the daemons this script starts (munged, slurmctld, slurmd)
#   scripts/slurm/local-slurm.sh status  exit 0 when a job can be submitted and runs
# Needs root and a reachable Debian mirror the first time; exits 3 when either is missing, so callers
# can tell "SLURM cannot be had on this machine" from "SLURM is broken" (any other failure).
# The node is described by `slurmd -C` (real CPUs and memory), in one partition `debug`; accounting
# is off, so jobs are followed with squeue (the Snakemake profile says so).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by instructflow scripts/slurm/local-slurm.sh"

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "local-slurm: needs root (it installs packages and starts system daemons)" >&2
        exit 3
    fi
}

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null && return
    command -v apt-get >/dev/null || { echo "local-slurm: no apt-get: install slurm-wlm and munge by hand" >&2; exit 3; }
    if ! apt-get update -qq || ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; then
        echo "local-slurm: could not install slurm-wlm and munge from the Debian mirror" >&2
        exit 3
    fi
}

write_config() {
    local host node
    host=$(hostname -s)
    # `slurmd -C` prints this host's real topology; a node line that claims more than the host has
    # would leave the node drained ("Low RealMemory").
    node=$(slurmd -C | grep '^NodeName=' | sed 's/ UpTime=.*//')
    mkdir -p /etc/slurm
    # A config we did not write belongs to someone else's cluster: never overwrite it.
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        echo "local-slurm: $CONF exists and was not written by this script; using it as is" >&2
        return
    fi
    cat >"$CONF.new" <<CONFEOF
$MARK
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=300
SlurmUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONFEOF
    mv "$CONF.new" "$CONF"
}

start_munge() {
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    test -f /etc/munge/munge.key || mungekey -c
    chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    chmod 0400 /etc/munge/munge.key
    munge -n >/dev/null 2>&1 || runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do munge -n >/dev/null 2>&1 && return; sleep 0.5; done
    echo "local-slurm: munged did not come up" >&2
    exit 1
}

start_slurm() {
    mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    pgrep -x slurmctld >/dev/null || slurmctld
    for _ in $(seq 30); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
    pgrep -x slurmd >/dev/null || slurmd
    # A node that was down (e.g. the host rebooted) comes back on its own with ReturnToService=2;
    # wait until it accepts work.
    for _ in $(seq 60); do
        state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1)
        [[ $state == idle* || $state == mixed* || $state == allocated* ]] && return
        sleep 0.5
    done
    echo "local-slurm: node not ready (state: ${state:-unknown}); see /var/log/slurm/" >&2
    sinfo -R >&2 || true
    exit 1
}

check() {
    timeout 60 srun --quiet -N1 -n1 -t 1 true
}

case "${1:-start}" in
start)
    need_root
    install_packages
    write_config
    start_munge
    start_slurm
    check
    echo "local-slurm: up ($(sinfo -h -o '%P %D %c CPUs %m MB'))"
    ;;
stop)
    need_root
    # By the pid files the daemons write, never by name: other SLURM processes are not ours to end.
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /var/run/slurmd.pid /var/run/slurmctld.pid /run/munge/munged.pid; do
        [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    ;;
status)
    check
    ;;
*)
    echo "usage: $0 [start|stop|status]" >&2
    exit 2
    ;;
esac
