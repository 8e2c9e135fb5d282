#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the `slurm` test tier (`make test-cluster`).
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge (when missing), writes a slurm.conf for this
# host and starts munged, slurmctld and slurmd, unless a cluster it started before still answers. Idempotent:
# run it as often as you like. Needs root and apt-get (a Debian or Ubuntu machine or container); where either
# is missing it says so and exits 77, the "skipped" status the tier's fixture understands.
#
# The cluster: one node `localhost` with every CPU of this machine and no GPUs, three partitions on it:
#   debug    (default)  PriorityTier=1, PreemptMode=REQUEUE, GraceTime=120: preempted by a job in `urgent`
#   lowgrace            PriorityTier=1, PreemptMode=REQUEUE, GraceTime=0: the same, requeued at once
#   urgent              PriorityTier=2
# KillWait=120 (scancel, requeue, preemption without a GraceTime) and GraceTime=120 give a job that long between
# SIGTERM and SIGKILL, enough for the ranks of a test run to finish their step and checkpoint.
set -euo pipefail

SKIP=77
CONF_DIR=/etc/slurm
STATE_DIR=${SLURM_TEST_STATE:-/var/spool/fuxi-slurm}
LOG_DIR=${SLURM_TEST_LOGS:-/var/log/fuxi-slurm}

say() { echo "start_slurm: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "not root: cannot install or start slurmctld/slurmd here; the slurm tier is skipped"
    exit $SKIP
fi

answers() { timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -q -E '^(idle|mixed|allocated|completing)'; }

CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
CONF=$(cat <<EOF
# fuxi test cluster: written by tests/cluster/start_slurm.sh (one node, this machine)
ClusterName=fuxi-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=120
MinJobAge=3600
SchedulerType=sched/backfill
SchedulerParameters=defer_batch
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=/run/fuxi-slurmctld.pid
SlurmdPidFile=/run/fuxi-slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=localhost NodeHostname=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=120
PartitionName=lowgrace Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=0
PartitionName=urgent Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
)

if command -v sinfo >/dev/null && [ "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" = "$CONF" ] && answers; then
    say "the test cluster is already up: $(sinfo -h -o '%P %T %c CPUs' | tr '\n' ' ')"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        say "no apt-get: install slurmctld, slurmd, slurm-client and munge yourself; the slurm tier is skipped"
        exit $SKIP
    fi
    say "installing slurmctld slurmd slurm-client munge (apt-get, about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null; }; then
        say "apt-get could not install the Slurm packages (no network or no Debian archive?); the slurm tier is skipped"
        exit $SKIP
    fi
fi


mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR" /run/munge /var/lib/munge /var/log/munge
printf '%s\n' "$CONF" > "$CONF_DIR/slurm.conf.tmp"
mv "$CONF_DIR/slurm.conf.tmp" "$CONF_DIR/slurm.conf"

# munge: a key of its own, owned by the munge user the package created (root where there is none)
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
MUNGE_USER=$(id -u munge >/dev/null 2>&1 && echo munge || echo root)
chown "$MUNGE_USER" /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
    if [ "$MUNGE_USER" = munge ]; then runuser -u munge -- munged --force; else munged --force; fi
fi

# (re)start the daemons on the configuration above
pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
for _ in $(seq 50); do { pgrep -x slurmctld || pgrep -x slurmd; } >/dev/null || break; sleep 0.2; done
slurmctld -c
slurmd -N localhost
for _ in $(seq 60); do
    if answers; then
        scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
        say "cluster up: $(sinfo -h -o '%P %T %c CPUs' | tr '\n' ' ')"
        exit 0
    fi
    sleep 1
done
say "slurmctld/slurmd did not come up within 60 s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
exit 1
