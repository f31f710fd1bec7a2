#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine where none answers (CI, or trying the SLURM profile locally).
#
#   sudo bash scripts/start_slurm.sh      # then: sinfo; srun hostname
#
# Does nothing when `sinfo` already shows a responding node. Otherwise, as root: installs Debian's packages when
# missing (slurmctld slurmd slurm-client munge), writes /etc/slurm/slurm.conf for this host (all its CPUs, one
# partition `debug`, the default), starts munged, slurmctld and slurmd, and waits until the node is idle.
# No accounting database (slurmdbd): finished jobs are recorded by jobcomp/filetxt in $RPG_SLURM_JOBCOMP
# (default /var/log/slurm/jobcomp.log) and Snakemake's executor polls job states with squeue
# (`--slurm-status-command squeue --slurm-no-account`). Exit status: 0 when a cluster answers, 1 when it could not be
# started (the reason on stderr), 2 when none answers and this is not root (nothing was changed).
set -euo pipefail

JOBCOMP=${RPG_SLURM_JOBCOMP:-/var/log/slurm/jobcomp.log}

cluster_up() {
    command -v sinfo >/dev/null 2>&1 && sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

if cluster_up; then
    echo "start_slurm: a SLURM cluster already answers: $(sinfo -h -o '%P %D %T' | tr '\n' ' ')"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "start_slurm: no SLURM cluster answers and this is not root: nothing started" >&2
    exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null \
    || ! command -v munged >/dev/null; then
    echo "start_slurm: installing slurmctld slurmd slurm-client munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

# munge: the key Debian's package made, else a new one; one daemon
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge
if ! pgrep -u munge -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$(dirname "$JOBCOMP")"
cat >/etc/slurm/slurm.conf <<EOF
# One-node test cluster written by scripts/start_slurm.sh
ClusterName=rpg
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 60); do
    if cluster_up; then
        echo "start_slurm: cluster up: $(sinfo -h -o '%P %D %c CPUs %T' | tr '\n' ' ')"
        exit 0
    fi
    sleep 0.5
done
echo "start_slurm: the node did not become idle in 30 s; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
sinfo >&2 || true
exit 1
