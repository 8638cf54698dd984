#!/bin/sh
# guest-test.sh - runs INSIDE the QEMU guest (busybox sh) started by vm/run-vm-test.sh.
#
# Drives the real kernel VFIO migration uAPI through the project's static
# /bin/vfio-multifd binary only, against two mtty-2 mdevs (samples/vfio-mdev/mtty.c).
#
# Output contract (parsed by run-vm-test.sh):
#   VMTEST: PASS <case>
#   VMTEST: FAIL <case>: <why>
#   VMTEST_RESULT: PASS|FAIL <n_pass> <n_fail>     (last; also written to /tmp/vmtest-result)
# Diagnostics are printed as "GUEST: ..." lines.
#
# Env: VMTEST_ONLY=case1,case2  run only these cases (setup always runs)
#      VMTEST_NOQEMU=1           the host has no QEMU 10 for qemu-interop (it says why)
#      VMTEST_CMD_TIMEOUT=30     seconds per CLI call
#
# mtty facts this relies on (read from samples/vfio-mdev/mtty.c, 6.12):
#  * region 0 is BAR0 = port 0 of the device, an emulated 16550 UART, 8 bytes.
#    Offsets: 0 = TX (write) / RX (read), 2 = FCR (write), 5 = LSR (read), 7 = SCR.
#  * The UART is a permanent loopback: a TX write pushes the byte into a 16-byte
#    FIFO (when LCR.DLAB=0, the default), an RX read pops it. No MCR setup needed.
#    FCR=0x07 (enable FIFO + clear RCVR/XMIT) empties the FIFO and keeps it 16 deep.
#    LSR bit 0 (DR) = FIFO not empty.
#  * mtty handles only the FIRST byte of a 2- or 4-byte aligned access, so every
#    BAR access here is one byte (one region-read/-write of --len 1 per FIFO byte).
#  * UART registers and the FIFO are part of the migration stream (struct
#    serial_port) and survive close(); the migration state also survives close().
#  * Stream = 24-byte header (magic 0x7e9d09898c3e2c4e LE, version 1.0, nr_ports,
#    flags) + 36 bytes per port = 96 bytes for mtty-2. A bad magic or nr_ports
#    makes write() fail with EFAULT; a short stream makes RESUMING->STOP fail with EINVAL.

B=/bin/vfio-multifd
TYPE=/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2
SRC=83b8f4f2-509f-382f-3c1e-e6bfe0fa1001
DST=83b8f4f2-509f-382f-3c1e-e6bfe0fa1002
SRC2=83b8f4f2-509f-382f-3c1e-e6bfe0fa1003
DST2=83b8f4f2-509f-382f-3c1e-e6bfe0fa1004
CT=${VMTEST_CMD_TIMEOUT:-30}
NPASS=0
NFAIL=0
PORT=5550
W=/tmp/vmtest
mkdir -p $W

now() { cut -d' ' -f1 /proc/uptime; }
T_ALL=$(now)
info() { echo "GUEST: $*"; }
pass() { echo "VMTEST: PASS $1"; NPASS=$((NPASS + 1)); }
fail() {
  echo "VMTEST: FAIL $1: $(printf %s "$2" | tr '\n' ' ' | cut -c1-300)"
  NFAIL=$((NFAIL + 1))
  [ -s $W/last.out ] && sed -n '1,15s/^/GUEST:   | /p' $W/last.out
  : > $W/last.out
}
want() { # want <case>: selected by VMTEST_ONLY?
  [ -z "$VMTEST_ONLY" ] && return 0
  case ",$VMTEST_ONLY," in *",$1,"*) return 0 ;; esac
  return 1
}
timed_out() { [ "$1" = 124 ] || [ "$1" = 143 ] || [ "$1" = 137 ]; }

# run <cmd...>: runs with a timeout; output in $OUT (and $W/last.out), status in $RC
run() {
  timeout "$CT" "$@" > $W/last.out 2>&1
  RC=$?
  OUT=$(cat $W/last.out)
  if timed_out $RC; then OUT="$OUT
(timed out after ${CT}s: $*)"; fi
  return $RC
}
# why: short description of the last failed command
why() { echo "'$*' rc=$RC$(timed_out $RC && echo ' (TIMEOUT)'): $(echo "$OUT" | grep -v '^$' | tail -1)"; }

# ------------------------------------------------------------ device helpers
# get_state <dev>: echoes the state name found in `dev state` output
get_state() {
  run $B dev state "$1" || { echo "?"; return 1; }
  for s in RUNNING_P2P PRE_COPY_P2P PRE_COPY STOP_COPY RESUMING RUNNING STOP ERROR; do
    if echo "$OUT" | grep -qw "$s"; then echo $s; return 0; fi
  done
  echo "?($(echo "$OUT" | tr '\n' ' ' | cut -c1-100))"
  return 1
}
set_state() { run $B dev state "$1" "$2"; }
# expect_state <case> <dev> <STATE>: fails the case (returns 1) on mismatch
expect_state() {
  st=$(get_state "$2")
  [ "$st" = "$3" ] && return 0
  fail "$1" "$2 state is '$st', expected $3"
  return 1
}
wb() { run $B dev region-write "$1" --region 0 --offset "$2" --hex "$3"; } # write one byte
# rb <dev> <offset>: echoes one byte as 2 lowercase hex digits
rb() {
  run $B dev region-read "$1" --region 0 --offset "$2" --len 1 || return 1
  # accept "5a", "0x5a", "[5a]", "0007: 5a": last non-empty line, text up to the last ':' ignored
  h=$(echo "$OUT" | grep -v '^$' | tail -1 | sed 's/.*://' | tr 'A-F' 'a-f' | sed 's/0x//g' | tr -cd '0-9a-f')
  if [ ${#h} -ne 2 ]; then
    OUT="region-read output not one hex byte: $OUT"
    RC=99
    return 1
  fi
  echo "$h"
}
hexof() { printf %s "$1" | od -An -tx1 | tr -d ' \n'; }
# load_uart <dev> <scr-hex> <fifo-string>: empty the FIFO, set SCR, push the string into TX
load_uart() {
  wb "$1" 2 07 || return 1
  wb "$1" 7 "$2" || return 1
  for x in $(printf %s "$3" | od -An -tx1); do wb "$1" 0 "$x" || return 1; done
}
# check_uart <case> <dev> <scr-hex> <fifo-string>: SCR matches and the FIFO pops exactly the string
check_uart() {
  v=$(rb "$2" 7) || { fail "$1" "read SCR of $2: $(why region-read)"; return 1; }
  [ "$v" = "$3" ] || { fail "$1" "$2 SCR=0x$v, expected 0x$3"; return 1; }
  want_hex=$(hexof "$4")
  got=""
  for x in $(printf %s "$4" | od -An -tx1); do
    v=$(rb "$2" 0) || { fail "$1" "read RX of $2: $(why region-read)"; return 1; }
    got="$got$v"
  done
  [ "$got" = "$want_hex" ] || { fail "$1" "$2 RX FIFO gave $got, expected $want_hex ('$4')"; return 1; }
  v=$(rb "$2" 5) || { fail "$1" "read LSR of $2: $(why region-read)"; return 1; }
  case $v in
    *[13579bdf]) fail "$1" "$2 FIFO not empty after '$4' (LSR=0x$v)"; return 1 ;;
  esac
  return 0
}

# ------------------------------------------------------------ migration helpers
next_port() { PORT=$((PORT + 1)); }
# wait_listen <port> <pid>: until something listens on the port (max ~10 s)
wait_listen() {
  i=0
  while [ $i -lt 100 ]; do
    netstat -ltn 2> /dev/null | grep -q ":$1 " && return 0
    kill -0 "$2" 2> /dev/null || return 1
    sleep 0.1
    i=$((i + 1))
  done
  return 1
}
# migrate <case> <recv-args> -- <send-args>: recv in the background, send in the
# foreground, both with timeouts. Sets RRC/SRC_RC and $W/recv.out, $W/send.out.
migrate() {
  c=$1
  shift
  rargs=""
  while [ "$1" != "--" ]; do rargs="$rargs $1"; shift; done
  shift
  next_port
  # shellcheck disable=SC2086
  timeout $((CT * 2)) $B recv --listen 127.0.0.1:$PORT $rargs > $W/recv.out 2>&1 &
  rpid=$!
  if ! wait_listen $PORT $rpid; then
    if kill -0 $rpid 2> /dev/null; then
      info "$c: recv not listening on $PORT after 10 s (continuing; send should retry)"
    else
      info "$c: recv exited before listening on $PORT"
    fi
  fi
  if [ -n "$SEND_FEED" ]; then
    # send's stdin is the output of the shell command $SEND_FEED (its manual-switchover console)
    # shellcheck disable=SC2086
    sh -c "$SEND_FEED" | timeout $CT $B send --connect 127.0.0.1:$PORT "$@" > $W/send.out 2>&1
  else
    # shellcheck disable=SC2086
    timeout $CT $B send --connect 127.0.0.1:$PORT "$@" > $W/send.out 2>&1
  fi
  SRC_RC=$?
  wait $rpid
  RRC=$?
  info "$c: recv$rargs -> $RRC; send $* -> $SRC_RC"
}
# dump the recv/send output as diagnostics
dump_io() {
  sed -n '1,10s/^/GUEST:   recv| /p' $W/recv.out
  sed -n '1,10s/^/GUEST:   send| /p' $W/send.out
}
# mig_case <case> <scr> <string> <recv-extra> -- <send-extra>: full src->dst migration + checks
mig_case() {
  c=$1 scr=$2 str=$3
  shift 3
  rx=""
  while [ "$1" != "--" ]; do rx="$rx $1"; shift; done
  shift
  want "$c" || return 0
  load_uart $SRC "$scr" "$str" || { fail "$c" "loading src UART: $(why region-write)"; return; }
  load_uart $DST 00 "" || { fail "$c" "clearing dst UART: $(why region-write)"; return; }
  expect_state "$c" $SRC RUNNING || return
  expect_state "$c" $DST RUNNING || return
  # shellcheck disable=SC2086
  migrate "$c" -P 4 --device $DST $rx -- -P 4 --device $SRC "$@"
  if [ $RRC != 0 ] || [ $SRC_RC != 0 ]; then
    dump_io
    fail "$c" "recv rc=$RRC send rc=$SRC_RC$(timed_out $RRC && echo ' (recv TIMEOUT)')$(timed_out $SRC_RC && echo ' (send TIMEOUT)')"
    return
  fi
  expect_state "$c" $DST RUNNING || return
  expect_state "$c" $SRC RUNNING || return
  check_uart "$c" $DST "$scr" "$str" || return
  # the source keeps its state too (migration must not consume it)
  v=$(rb $SRC 7) && [ "$v" = "$scr" ] || { fail "$c" "src SCR=0x$v after migration, expected 0x$scr"; return; }
  pass "$c"
}

# ====================================================================== cases
info "guest-test start at uptime ${T_ALL}s, binary $(ls -l $B 2> /dev/null | awk '{print $5}') bytes"

# --- setup (always runs): mdevs exist
c=setup
if [ ! -c /dev/vfio/vfio ]; then
  fail $c "no /dev/vfio/vfio (vfio module not loaded?)"
elif [ ! -d $TYPE ]; then
  fail $c "no $TYPE (mtty module not loaded?)"
else
  for u in $SRC $DST; do
    [ -d /sys/bus/mdev/devices/$u ] || echo $u > $TYPE/create 2> $W/last.out
  done
  if [ -d /sys/bus/mdev/devices/$SRC ] && [ -d /sys/bus/mdev/devices/$DST ]; then
    GSRC=$(basename "$(readlink /sys/bus/mdev/devices/$SRC/iommu_group)")
    GDST=$(basename "$(readlink /sys/bus/mdev/devices/$DST/iommu_group)")
    info "mdevs: src $SRC (group $GSRC), dst $DST (group $GDST); /dev/vfio: $(ls /dev/vfio | tr '\n' ' ')"
    if [ -c /dev/vfio/$GSRC ] && [ -c /dev/vfio/$GDST ]; then pass $c; else fail $c "no /dev/vfio/<group> nodes"; fi
  else
    fail $c "creating mtty-2 mdevs failed"
  fi
fi
if [ ! -x $B ]; then fail binary "$B missing"; fi

# --- dev info: migration flags 0x7 = STOP_COPY|P2P|PRE_COPY, by every device-name form
info_case() {
  c=$1 dev=$2
  want $c || return 0
  run $B dev info "$dev" || { fail $c "$(why dev info "$dev")"; return; }
  if echo "$OUT" | grep -iqE 'flags[^0-9a-z]*0x0*7([^0-9a-fx]|$)'; then pass $c; else
    fail $c "'dev info' output has no 'flags ... 0x7'"
  fi
}
info_case dev-info $SRC
info_case dev-info-sysfs /sys/bus/mdev/devices/$SRC
info_case dev-info-group "group:$GSRC/$SRC"
if want dev-info-size; then
  run $B dev info $SRC
  sz=$(echo "$OUT" | grep -iE 'size|length' | grep -oE '[0-9]+' | grep -x 96)
  info "dev info $SRC: $(echo "$OUT" | tr '\n' ';')"
  if [ "$sz" = 96 ]; then pass dev-info-size; else fail dev-info-size "no data size 96 (mtty-2 stop_copy_length) in 'dev info'"; fi
fi

# --- dev state: read, walk and come back
state_case() {
  c=dev-state
  want $c || return 0
  expect_state $c $SRC RUNNING || return
  for st in STOP STOP_COPY STOP RUNNING PRE_COPY RUNNING STOP_COPY RUNNING; do
    set_state $SRC $st || { fail $c "$(why dev state $SRC $st)"; return; }
    expect_state $c $SRC $st || return
  done
  if set_state $SRC BOGUS_STATE; then fail $c "'dev state $SRC BOGUS_STATE' succeeded"; return; fi
  expect_state $c $SRC RUNNING || return
  pass $c
}
state_case

# --- region read/write: SCR round trip and FIFO loopback on the destination device
c=region-rw
if want $c; then
  if ! load_uart $DST c3 "AB"; then fail $c "$(why region-write)"
  elif check_uart $c $DST c3 "AB"; then pass $c; fi
fi

# --- dev reset from STOP_COPY gives RUNNING
c=dev-reset
if want $c; then
  if ! set_state $DST STOP_COPY; then fail $c "$(why dev state $DST STOP_COPY)"
  elif ! run $B dev reset $DST; then fail $c "$(why dev reset $DST)"
  elif expect_state $c $DST RUNNING; then pass $c; fi
fi

# --- dev check-reset (STOP_COPY, reset, old data fd gives ENODEV), in one process
c=check-reset
if want $c; then
  if ! run $B dev check-reset $SRC; then fail $c "$(why dev check-reset $SRC)"
  elif expect_state $c $SRC RUNNING; then pass $c; fi
fi

# --- migrations src -> dst over loopback TCP, 4 channels
mig_case migrate-uring 5a "HELLO" --backend uring -- --backend uring
mig_case migrate-blocking a5 "WORLD" --backend blocking -- --backend blocking
mig_case migrate-precopy 3c "PRECOPY" -- --precopy
mig_case migrate-precopy-blocking 4b "PB" --backend blocking -- --precopy --backend blocking

# --- dev precopy: PRE_COPY info, read to the temporary end (mtty: 0), STOP_COPY, EOF, RUNNING
c=dev-precopy
if want $c; then
  if ! run $B dev precopy $SRC; then fail $c "$(why dev precopy $SRC)"
  else
    info "dev precopy: $(echo "$OUT" | tr '\n' ';')"
    if ! echo "$OUT" | grep -iqE 'initial_bytes[^0-9]*24([^0-9]|$)'; then fail $c "no 'initial_bytes ... 24' in output"
    elif ! echo "$OUT" | grep -iqE 'dirty_bytes[^0-9]*0([^0-9]|$)'; then fail $c "no 'dirty_bytes ... 0' in output"
    elif ! echo "$OUT" | grep -iqE 'total[^0-9]*96([^0-9]|$)'; then fail $c "no 'total ... 96' in output"
    elif expect_state $c $SRC RUNNING; then pass $c; fi
  fi
fi

# --- saved stream: recv --sink file, then replay it with send --source file
S=$W/stream.bin
c=stream-save
if want $c || want stream-replay || want stream-corrupt || want stream-corrupt-magic ||
  want stream-corrupt-nrports || want stream-truncated; then
  load_uart $SRC 77 "SAVED" || fail $c "loading src UART: $(why region-write)"
  rm -f $S
  migrate $c -P 4 --device $DST --sink file:$S -- -P 4 --device $SRC
  magic=$(dd if=$S bs=8 count=1 2> /dev/null | od -An -tx1 | tr -d ' \n')
  size=$(wc -c 2> /dev/null < $S || echo 0)
  if [ $RRC != 0 ] || [ $SRC_RC != 0 ]; then dump_io; fail $c "recv rc=$RRC send rc=$SRC_RC"
  elif [ "$size" != 96 ]; then fail $c "sink file has $size bytes, expected the raw 96-byte mtty-2 device stream"
  elif [ "$magic" != 4e2c3e8c89099d7e ]; then fail $c "sink file starts with $magic, not the mtty magic 0x7e9d09898c3e2c4e (LE)"
  elif expect_state $c $SRC RUNNING; then pass $c; fi
fi
c=stream-replay
if want $c; then
  load_uart $DST 00 "" || fail $c "clearing dst UART: $(why region-write)"
  migrate $c -P 4 --device $DST -- -P 4 --device $SRC --source file:$S
  if [ $RRC != 0 ] || [ $SRC_RC != 0 ]; then dump_io; fail $c "recv rc=$RRC send rc=$SRC_RC"
  elif expect_state $c $DST RUNNING && check_uart $c $DST 77 "SAVED"; then pass $c; fi
fi
# corrupt_case <case> <what>: replay a damaged copy of the stream into dst; recv must
# fail with a message, and dst must be recoverable with `dev reset`.
corrupt_case() {
  c=$1 what=$2
  want $c || want stream-corrupt || return 0
  [ -s $S ] || { fail $c "no saved stream ($S)"; return; }
  cp $S $W/bad.bin
  # Keep the config blob, so the failure is the stream's and not a missing config.
  cp $S.config $W/bad.bin.config 2> /dev/null || true
  case $what in
    magic) printf '\000' | dd of=$W/bad.bin bs=1 seek=0 conv=notrunc 2> /dev/null ;;
    nr_ports) printf '\001' | dd of=$W/bad.bin bs=1 seek=16 conv=notrunc 2> /dev/null ;;
    truncate) head -c 60 $S > $W/bad.bin ;;
  esac
  migrate $c -P 4 --device $DST -- -P 4 --device $SRC --source file:$W/bad.bin
  if [ $RRC = 0 ]; then dump_io; fail $c "recv accepted a stream with bad $what"; return; fi
  if timed_out $RRC; then dump_io; fail $c "recv hung (timeout) on a stream with bad $what"; return; fi
  if ! grep -q '[a-zA-Z]' $W/recv.out; then fail $c "recv failed (rc=$RRC) without an error message"; return; fi
  info "$c: recv error: $(grep -v '^$' $W/recv.out | tail -2 | tr '\n' ' ')"
  # The kernel must be the one that rejects it: mtty's write() fails on a bad header
  # (EFAULT), and RESUMING -> STOP fails on a short stream (EINVAL).
  case $what in
    truncate) want_err='RESUMING -> STOP.*Invalid argument' ;;
    *) want_err='writing packet 0 to the resume data fd failed.*Bad address' ;;
  esac
  if ! grep -q "$want_err" $W/recv.out; then fail $c "recv error does not match '$want_err'"; return; fi
  if ! run $B dev reset $DST; then fail $c "$(why dev reset $DST) after the failed load"; return; fi
  expect_state $c $DST RUNNING || return
  pass $c
}
corrupt_case stream-corrupt-magic magic
corrupt_case stream-corrupt-nrports nr_ports
corrupt_case stream-truncated truncate
# after the failures, a good migration into the same destination must work
mig_case migrate-after-error e7 "AGAIN" --backend uring -- --backend uring

# --- the guest changes the device while pre-copy runs: UART writes made through send's
# manual-switchover console (`region-write`: the group is send's alone during the migration)
# after pre-copy started must be in the destination's state, with the source's earlier state.
c=live-guest-write
if want $c; then
  if ! { load_uart $SRC 5e "PRE" && load_uart $DST 00 ""; }; then
    fail $c "loading the UARTs: $(why region-write)"
  else
    SEND_FEED="printf 'region-write 0 0 7 e5\\nregion-write 0 0 0 21\\n'; sleep 1; echo switchover"
    migrate $c -P 2 --device $DST -J -- -P 2 --device $SRC --precopy --switchover manual --max-precopy 60s -J
    SEND_FEED=""
    n_ok=$(grep -c 'console: region-write ok' $W/send.out)
    if [ $RRC != 0 ] || [ $SRC_RC != 0 ]; then
      dump_io
      fail $c "recv rc=$RRC send rc=$SRC_RC"
    elif [ "$n_ok" != 2 ]; then
      dump_io
      fail $c "the console reported $n_ok of 2 region writes ok"
    elif ! grep -q '"trigger": "stdin"' $W/send.out; then
      dump_io
      fail $c "the switchover was not triggered by the console line"
    elif ! grep -q '"verdict": "loaded"' $W/send.out; then
      dump_io
      fail $c "the destination's verdict is not 'loaded'"
    elif expect_state $c $DST RUNNING && expect_state $c $SRC RUNNING && check_uart $c $DST e5 "PRE!"; then
      pass $c
    fi
  fi
fi

# --- two mtty devices in one live session: pre-copy (mtty has PRE_COPY and P2P), the
# switchover acknowledged by the destination over the return path with the real driver, both
# devices P2P-quiesced before either stops, both UART states at the destination.
c=live-two-devices
if want $c; then
  for u in $SRC2 $DST2; do
    [ -d /sys/bus/mdev/devices/$u ] || echo $u > $TYPE/create 2> $W/last.out
  done
  if [ ! -d /sys/bus/mdev/devices/$SRC2 ] || [ ! -d /sys/bus/mdev/devices/$DST2 ]; then
    fail $c "creating a second pair of mtty-2 mdevs failed"
  elif ! { load_uart $SRC 61 "ONE" && load_uart $SRC2 62 "TWO" && load_uart $DST 00 "" && load_uart $DST2 00 ""; }; then
    fail $c "loading the UARTs: $(why region-write)"
  else
    migrate $c -P 4 --device $DST --device $DST2 -J -- -P 4 --device $SRC --device $SRC2 --precopy -J
    if [ $RRC != 0 ] || [ $SRC_RC != 0 ]; then
      dump_io
      fail $c "recv rc=$RRC send rc=$SRC_RC"
    elif ! grep -q '"acked": true' $W/send.out; then
      dump_io
      fail $c "the switchover was not acknowledged by the destination"
    elif ! grep -q '"verdict": "loaded"' $W/send.out; then
      dump_io
      fail $c "the destination's verdict is not 'loaded'"
    elif expect_state $c $DST RUNNING && expect_state $c $DST2 RUNNING && check_uart $c $DST 61 "ONE" &&
      check_uart $c $DST2 62 "TWO"; then
      pass $c
    fi
  fi
  for u in $SRC2 $DST2; do
    [ -d /sys/bus/mdev/devices/$u ] && echo 1 > /sys/bus/mdev/devices/$u/remove 2>> $W/last.out
  done
fi

# --- real QEMU 10 as the peer: a QEMU -> QEMU migration of an mtty device captured by the
# project's tee, decoded, compared with the project's encoder and replayed (the case's own file)
if [ -f /guest-qemu-interop.sh ]; then
  . /guest-qemu-interop.sh
elif want qemu-interop; then
  fail qemu-interop "/guest-qemu-interop.sh is not in the initramfs"
fi

# --- final: both devices RUNNING and removable (no process kept them open)
c=teardown
if [ -z "$VMTEST_ONLY" ]; then
  if expect_state $c $SRC RUNNING && expect_state $c $DST RUNNING; then
    echo 1 > /sys/bus/mdev/devices/$SRC/remove 2> $W/last.out &&
      echo 1 > /sys/bus/mdev/devices/$DST/remove 2>> $W/last.out &&
      pass $c || fail $c "removing the mdevs failed"
  fi
fi

[ $NFAIL = 0 ] && [ $NPASS -gt 0 ] && R=PASS || R=FAIL
info "guest-test done in $(awk -v a="$T_ALL" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}')s"
echo "VMTEST_RESULT: $R $NPASS $NFAIL" | tee /tmp/vmtest-result
