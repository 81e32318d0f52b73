# Sourced by tools/test.sh and tools/check.sh (from the checkout root):
# every etcd (and nginx, and wrong peer) the specs start is recorded by PID
# in $ETCD3_SPEC_PIDFILE; spec_pids_cleanup stops whatever a crashed run
# left behind by those PIDs, each only while it is still such a process.
spec_pids_cleanup() {
  while read -r pid; do
    if [ -n "$pid" ] && grep -qaE '^(etcd|nginx|/usr/bin/python3)' "/proc/$pid/cmdline" 2>/dev/null; then
      kill -9 "$pid" 2>/dev/null
    fi
  done < "$ETCD3_SPEC_PIDFILE"
}
