#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the tests marked `slurm` and for trying
# `hydra/launcher=slurm` without a real cluster. Needs root (apt, daemons); idempotent.
#
#   scripts/slurm_local.sh start    # install slurm-wlm + munge if missing, configure, start, wait
#   scripts/slurm_local.sh stop     # stop slurmd, slurmctld, munged
#   scripts/slurm_local.sh status   # sinfo
#
# One node (this host, on 127.0.0.1) in partition `local`, with this machine's CPUs and 80% of its
# free memory. No cgroups, no systemd: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
PARTITION=${SLURM_LOCAL_PARTITION:-local}
NODE=$(hostname -s)

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "slurm_local.sh: must run as root (installs packages, starts daemons)" >&2
    exit 1
  fi
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null
  then
    return
  fi
  echo "slurm_local.sh: installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(awk '/MemAvailable/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
  mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
  cat >"$CONF.new" <<EOF
# Written by scripts/slurm_local.sh: one node, no accounting, no cgroups.
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  # Keep the running daemons' config unless the node's shape changed (CPUs/memory drift a little).
  if [ -f "$CONF" ] && diff -q <(grep -v RealMemory "$CONF") <(grep -v RealMemory "$CONF.new") \
    >/dev/null; then
    rm "$CONF.new"
  else
    mv "$CONF.new" "$CONF"
    if running slurmctld; then
      scontrol reconfigure
    fi
  fi
}

# Our daemons, found by their pid files (not by name).
PIDFILE_slurmctld=/run/slurmctld.pid
PIDFILE_slurmd=/run/slurmd.pid
PIDFILE_munged=/run/munge/munged.pid

pid_of() {
  local file="PIDFILE_$1"
  [ -s "${!file}" ] && cat "${!file}"
}

running() {
  local pid
  pid=$(pid_of "$1") && kill -0 "$pid" 2>/dev/null
}

start_munge() {
  if running munged; then
    return
  fi
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged
}

node_state() {
  sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true
}

start() {
  need_root
  install_packages
  write_config
  start_munge
  running slurmctld || slurmctld
  running slurmd || slurmd
  local state=""
  for _ in $(seq 60); do
    state=$(node_state)
    case "$state" in
      idle | mixed | allocated) break ;;
      drain* | down*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
  done
  case "$state" in
    idle | mixed | allocated) ;;
    *)
      echo "slurm_local.sh: node $NODE is '${state:-unreachable}' after 60 s; see $LOG_DIR" >&2
      tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
      exit 1
      ;;
  esac
  sinfo
}

stop() {
  need_root
  local daemon
  for daemon in slurmd slurmctld munged; do
    if running "$daemon"; then
      kill "$(pid_of "$daemon")"
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
