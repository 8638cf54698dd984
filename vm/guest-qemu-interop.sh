# guest-qemu-interop.sh - the qemu-interop case, sourced by guest-test.sh INSIDE the guest
# (busybox sh; uses guest-test.sh's helpers: run, fail, pass, info, load_uart, check_uart,
# migrate, wait_listen, next_port).
#
# Real QEMU 10 (Debian trixie's, unpacked by the host into /opt/qemu10, run through its own
# ld-linux) migrates an mtty device from one paused QEMU to another through the project's
# `vfio-multifd tee`, which records each connection. Then, with the project's binary only:
#  1. `dump` decodes every byte of both multifd channels and the main channel, and finds the
#     device's packets (idx 0 data, idx 1 config) and its pre-copy bytes (main channel);
#  2. the project's encoder reproduces QEMU's 288 header bytes of every device-state packet
#     (dump re-encodes each one and compares; the headers are printed for the golden vectors);
#  3. the device stream dump rebuilt (QEMU's pre-copy bytes + its stop-copy packets), sent by
#     `send --source file:` into `recv --device` of a fresh mtty, gives that mtty the UART
#     state of QEMU's source device.
# The destination QEMU's mtty must also hold the source's UART state after `cont`.
#
# QEMU facts this relies on (QEMU 10.0, tried by hand first): mtty's DMA-logging hooks are
# stubs, so the source needs x-device-dirty-page-tracking=off; the monitor is HMP over a
# `pipe` chardev (QEMU opens DIR/x.in and DIR/x.out read-write, so a writer that comes and
# goes never gives it an EOF).

QT=/opt/qemu10
QSRC=83b8f4f2-509f-382f-3c1e-e6bfe0fa1005
QDST=83b8f4f2-509f-382f-3c1e-e6bfe0fa1006
QNEW=83b8f4f2-509f-382f-3c1e-e6bfe0fa1007
Q=$W/qemu
QPIDS=""

# qalive <s|d>: that QEMU still runs
qalive() { eval "kill -0 \$QPID_$1" 2> /dev/null; }
# qhmp <s|d> <command>: one HMP command to a running QEMU (the FIFO open is bounded too)
qhmp() { qalive "$1" && timeout 10 sh -c 'echo "$1" > "$2"' _ "$2" "$Q/$1.in"; }
# qwait <s|d> <regex> <seconds> [<command to repeat>]: until the monitor output matches
qwait() {
  i=0
  while [ $i -lt $(($3 * 5)) ]; do
    [ -n "$4" ] && qhmp "$1" "$4"
    sleep 0.2
    tr -d '\r' < $Q/$1.txt 2> /dev/null | grep -aqE "$2" && return 0
    qalive "$1" || return 1
    i=$((i + 1))
  done
  return 1
}
# qstart <s|d> <mdev> [args...]: a paused QEMU with the mdev, its monitor on $Q/<s|d>.{in,out}
qstart() {
  m=$1 dev=$2
  shift 2
  mkfifo $Q/$m.in $Q/$m.out
  $QT/qemu -M q35 -nodefaults -no-user-config -display none -m 64 -S -accel tcg,tb-size=16 \
    -chardev pipe,id=mon,path=$Q/$m -mon chardev=mon,mode=readline \
    -device "vfio-pci,sysfsdev=/sys/bus/mdev/devices/$dev,enable-migration=on,x-device-dirty-page-tracking=off,x-migration-multifd-transfer=on" \
    "$@" > $Q/$m.log 2>&1 &
  eval "QPID_$m=$!"
  QPIDS="$QPIDS $!"
  cat $Q/$m.out > $Q/$m.txt &
  QPIDS="$QPIDS $!"
}
# qstop: quit both QEMUs (at most 20 s), then kill what is left
qstop() {
  qhmp s quit 2> /dev/null
  qhmp d quit 2> /dev/null
  i=0
  for p in $QPIDS; do
    while kill -0 $p 2> /dev/null && [ $i -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
    kill -9 $p 2> /dev/null
  done
  QPIDS=""
}
qdiag() {
  for m in s d; do
    [ -s $Q/$m.log ] && sed -n '1,6s/^/GUEST:   qemu-'$m'| /p' $Q/$m.log
    tr -d '\r' < $Q/$m.txt 2> /dev/null | grep -aE 'rror|tatus|failed' | tail -4 | sed 's/^/GUEST:   hmp-'$m'| /'
  done
  [ -s $Q/tee.out ] && sed -n '1,12s/^/GUEST:   tee| /p' $Q/tee.out
}

# qemu_migrate: QEMU -> tee -> QEMU; sets $Q/cap/conn-{0,1,2}.bin. Returns 1 after fail().
qemu_migrate() {
  c=qemu-interop
  qstart d $QDST -incoming defer
  qstart s $QSRC
  if ! qwait s '^\(qemu\)' 90 || ! qwait d '^\(qemu\)' 90; then
    qdiag
    fail $c "QEMU 10 did not bring up its monitor (it exited, or not within 90 s)"
    return 1
  fi
  info "$c: both QEMU $(cat $QT/VERSION) monitors up at uptime $(now)s"
  for m in s d; do
    qhmp $m "migrate_set_capability multifd on"
    qhmp $m "migrate_set_parameter multifd-channels 2"
  done
  next_port
  QPORT=$PORT
  qhmp d "migrate_incoming tcp:127.0.0.1:$QPORT"
  next_port
  timeout 150 $B tee --listen 127.0.0.1:$PORT --connect 127.0.0.1:$QPORT --record $Q/cap --connections 3 \
    --timeout 140 > $Q/tee.out 2>&1 &
  tpid=$!
  if ! wait_listen $QPORT $QPID_d; then
    qdiag
    fail $c "the destination QEMU does not listen on $QPORT"
    return 1
  fi
  wait_listen $PORT $tpid
  qhmp s "migrate -d tcp:127.0.0.1:$PORT"
  if ! qwait s 'Migration status: (completed|failed|cancelled)' 120 "info migrate"; then
    qdiag
    fail $c "the migration did not end in 120 s"
    return 1
  fi
  st=$(tr -d '\r' < $Q/s.txt | grep -aE 'Migration status:' | tail -1)
  info "$c: source $st at uptime $(now)s"
  case $st in *completed*) ;; *)
    qdiag
    fail $c "QEMU's migration: $st"
    return 1
    ;;
  esac
  qhmp d cont
  if ! qwait d 'VM status: running' 30 "info status"; then
    qdiag
    fail $c "the destination QEMU does not run after cont"
    return 1
  fi
  qstop
  wait $tpid
  trc=$?
  sed -n '1,12s/^/GUEST:   tee| /p' $Q/tee.out
  if [ $trc != 0 ]; then
    fail $c "tee exited $trc"
    return 1
  fi
  return 0
}

# qemu_dump: checks 1 and 2 on the capture. Returns 1 after fail().
qemu_dump() {
  c=qemu-interop
  set -- $Q/cap/conn-0.bin $Q/cap/conn-1.bin $Q/cap/conn-2.bin
  timeout $CT $B dump --out $Q/dump "$@" > $Q/dump.txt 2>&1
  drc=$?
  sed 's/^/GUEST:   dump| /' $Q/dump.txt
  if [ $drc != 0 ]; then
    fail $c "dump exited $drc on QEMU's capture"
    return 1
  fi
  timeout $CT $B dump -J "$@" > $Q/dump.json 2> $Q/last.out || {
    fail $c "dump -J failed"
    return 1
  }
  grep -E '"(header|init)_hex"' $Q/dump.json | sed 's/[ ",]//g; s/^\(header\|init\)_hex:/GUEST: qemu-interop \1: /'
  nmfd=$(grep -c '"kind": "multifd"' $Q/dump.json)
  nmain=$(grep -c '"kind": "main"' $Q/dump.json)
  nhdr=$(grep -A2 '"encoder"' $Q/dump.json | grep -o '"headers": [0-9]*' | grep -o '[0-9]*$')
  nsame=$(grep -A2 '"encoder"' $Q/dump.json | grep -o '"identical": [0-9]*' | grep -o '[0-9]*$')
  if [ "$nmfd" != 2 ] || [ "$nmain" != 1 ]; then
    fail $c "dump found $nmfd multifd and $nmain main channel(s), expected 2 and 1"
  elif ! grep -q '"stopped": null' $Q/dump.json; then
    fail $c "dump did not decode the main channel to its end: $(grep '"stopped"' $Q/dump.json)"
  elif [ "$nhdr" != 2 ]; then
    fail $c "dump found ${nhdr:-no} device-state packets, expected 2 (mtty's stop-copy data, then its config)"
  elif [ "$nsame" != "$nhdr" ]; then
    fail $c "the project's encoder reproduced $nsame of $nhdr QEMU headers"
  elif ! grep -q '"precopy_bytes": 24' $Q/dump.json; then
    fail $c "no 24 bytes of mtty pre-copy data found on the main channel"
  else
    return 0
  fi
  return 1
}

# qemu_replay: check 3. Returns 1 after fail().
qemu_replay() {
  c=qemu-interop
  S=$(ls $Q/dump/*.bin 2> /dev/null)
  if [ "$(echo "$S" | wc -w)" != 1 ]; then
    fail $c "dump wrote '$S', expected one device stream"
    return 1
  fi
  size=$(wc -c < $S)
  magic=$(dd if=$S bs=8 count=1 2> /dev/null | od -An -tx1 | tr -d ' \n')
  if [ "$size" != 96 ] || [ "$magic" != 4e2c3e8c89099d7e ]; then
    fail $c "rebuilt stream $S: $size bytes starting $magic, expected mtty-2's 96 bytes with its magic"
    return 1
  fi
  # QEMU's config packet is its own vfio-pci vmstate, which this project does not load; the
  # project's config blob (VFIOPCFG, payload length 0) leaves the config space alone.
  printf 'VFIOPCFG\000\000\000\000\000\000\000\000' > $S.config
  migrate $c -P 2 --device $QNEW -- -P 2 --source file:$S
  if [ $RRC != 0 ] || [ $SRC_RC != 0 ]; then
    dump_io
    fail $c "replaying QEMU's stream: recv rc=$RRC send rc=$SRC_RC"
    return 1
  fi
  check_uart $c $QNEW 9e "QEMU10" || return 1
  return 0
}

qemu_interop() {
  c=qemu-interop
  want $c || return 0
  if [ -n "$VMTEST_NOQEMU" ]; then
    info "$c: not run: the host could not prepare QEMU 10 ($VMTEST_NOQEMU)"
    return 0
  fi
  [ -x $QT/qemu ] || { fail $c "no QEMU 10 in the initramfs ($QT/qemu)"; return; }
  T_Q=$(now)
  rm -rf $Q
  mkdir -p $Q
  for u in $QSRC $QDST $QNEW; do
    [ -d /sys/bus/mdev/devices/$u ] || echo $u > $TYPE/create 2> $W/last.out
    [ -d /sys/bus/mdev/devices/$u ] || { fail $c "creating mtty-2 mdev $u failed"; return; }
  done
  if ! { load_uart $QSRC 9e "QEMU10" && load_uart $QDST 00 "" && load_uart $QNEW 00 ""; }; then
    fail $c "loading the UARTs: $(why region-write)"
  elif qemu_migrate; then
    # the destination QEMU's device got the source's UART state
    if check_uart $c $QDST 9e "QEMU10" && qemu_dump && qemu_replay; then
      info "$c: done in $(awk -v a="$T_Q" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')s"
      pass $c
    fi
  fi
  qstop
  for u in $QSRC $QDST $QNEW; do
    [ -d /sys/bus/mdev/devices/$u ] && echo 1 > /sys/bus/mdev/devices/$u/remove 2>> $W/last.out
  done
}
qemu_interop
