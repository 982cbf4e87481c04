#!/usr/bin/env bash
# A job longer than one device call (10 minutes) on the warm device machine. `start` launches it in its own
# process session (setsid), so it outlives the call that started it; `wait` (the following calls, made back to back
# so that the machine stays warm) waits for it up to SECONDS, prints the tail of its log and copies files to $OUT.
#
#   bash bench/device_background.sh start NAME CMD [ARGS...]     # returns at once
#   bash bench/device_background.sh wait NAME SECONDS [FILE...]  # exit 0: done, rc in NAME's state; 3: still running
#   bash bench/device_background.sh status NAME
#
# State (log, pid, rc) lives in ${BG_DIR:-/tmp/wanjax_bg}/NAME, outside the repo copy that each call replaces; the
# job runs in a snapshot of the calling directory taken there (NAME/src), since a later call's copy of the working
# tree (and of its carried paths) replaces the directory the job was started from. FILE patterns of `wait` are
# relative to that snapshot.
# e.g. issue 33's full-size quantization in one process (no reload between calls):
#   bash bench/device_background.sh start fq python -m bench.fullsize_quantize --experts both --work /tmp/fq --budget-s 1650
#   bash bench/device_background.sh wait fq 570 'bench/results/fullsize_quantize_*'
set -u
root=${BG_DIR:-/tmp/wanjax_bg}
cmd=${1:-}; name=${2:-}
if [ -z "$cmd" ] || [ -z "$name" ]; then
  echo "usage: $0 start NAME CMD... | wait NAME SECONDS [FILE...] | status NAME" >&2; exit 2
fi
dir="$root/$name"
running() { [ ! -f "$dir/rc" ] && [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; }
report() {
  local took; [ -f "$dir/t0" ] && took="$(( $(date +%s) - $(cat "$dir/t0") ))s"
  if [ -f "$dir/rc" ]; then echo "[$name] done: rc=$(cat "$dir/rc"), $took"
  elif running; then echo "[$name] running for $took"
  else echo "[$name] not running and no exit status (never started here, or killed with the machine)"; fi
}
case "$cmd" in
  start)
    shift 2
    [ $# -gt 0 ] || { echo "start: no command" >&2; exit 2; }
    if running; then
      echo "[$name] already running (pid $(cat "$dir/pid"))" >&2; exit 2
    fi
    rm -rf "$dir"; mkdir -p "$dir"; date +%s >"$dir/t0"
    printf '%q ' "$@" >"$dir/cmd"
    cp -a . "$dir/src" || { echo "start: could not snapshot $PWD into $dir/src" >&2; exit 2; }
    setsid bash -c 'cd "$1/src"; d=$1; shift; "$@" >"$d/log" 2>&1; echo $? >"$d/rc.tmp"; mv "$d/rc.tmp" "$d/rc"' \
      _ "$dir" "$@" </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/pid"
    echo "[$name] started (pid $(cat "$dir/pid")): $(cat "$dir/cmd")";;
  wait)
    secs=${3:?wait NAME SECONDS}; shift 3
    end=$(( $(date +%s) + secs ))
    while running && [ "$(date +%s)" -lt "$end" ]; do
      sleep 2
    done
    [ -f "$dir/log" ] && tail -n "${BG_TAIL:-40}" "$dir/log"
    if [ -n "${OUT:-}" ]; then
      [ -f "$dir/log" ] && cp "$dir/log" "$OUT/$name.log"
      for pat in "$@"; do for f in "$dir"/src/$pat; do [ -f "$f" ] && cp "$f" "$OUT/"; done; done
    fi
    report
    [ -f "$dir/rc" ] && exit 0
    exit 3;;
  status) report; [ -f "$dir/log" ] && tail -n "${BG_TAIL:-20}" "$dir/log"; exit 0;;
  *) echo "unknown command $cmd" >&2; exit 2;;
esac
