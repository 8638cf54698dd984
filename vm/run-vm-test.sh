#!/bin/bash
# run-vm-test.sh - boot a stock Debian kernel under QEMU with a real VFIO
# migration device (samples/vfio-mdev/mtty, built out of tree) and run the
# guest-side test (vm/guest-test.sh) against the project's static
# `vfio-multifd` binary.
#
# Exit status: 0 = guest reported VMTEST_RESULT: PASS
#              1 = FAIL (a test failed, timeout, boot failure, no result line,
#                  or any skip condition while CI=true)
#              2 = usage / build error (e.g. GUEST_BIN missing or not static)
#             77 = skipped (cannot run here: no network, no root for apt, ...)
#
# Nothing is installed into the host's /boot or /lib/modules: kernel packages
# are only downloaded (apt-get download) and unpacked (dpkg-deb -x) under
# $VM_WORK. See vm/README.md.
#
# Environment:
#   GUEST_BIN     static guest binary (default target/x86_64-unknown-linux-gnu/release/vfio-multifd)
#   GUEST_SCRIPT  guest test script (default vm/guest-test.sh)
#   VM_WORK       cache dir (default vm/work)
#   VM_KVER       force a kernel ABI, e.g. 6.12.117+deb12 (default: resolved via apt-cache)
#   VM_ACCEL      tcg (default) | kvm (kvm: -cpu host; does NOT work on the dev hosts)
#   VM_TIMEOUT    seconds for the whole QEMU run (default 300; 420 with qemu-interop)
#   VM_GUEST_TIMEOUT  seconds the guest gives guest-test.sh (default VM_TIMEOUT-30)
#   VM_ONLY       space-separated list of guest test cases to run (default: all; qemu-interop
#                 is the real QEMU 10 case, which fetches QEMU with vm/qemu10.sh)
#   VM_VERBOSE=1  print the whole guest console, not just the VMTEST/GUEST lines
#   VM_NO_APT=1   never call apt-get install/update (skip if tools are missing)
#   VM_PREP_ONLY=1  only install tools and prepare the kernel cache (no GUEST_BIN needed, no boot)
#   CI=true       any skip becomes a failure
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
VM_WORK=${VM_WORK:-$ROOT/vm/work}
GUEST_BIN=${GUEST_BIN:-$ROOT/target/x86_64-unknown-linux-gnu/release/vfio-multifd}
GUEST_SCRIPT=${GUEST_SCRIPT:-$SCRIPT_DIR/guest-test.sh}
VM_ACCEL=${VM_ACCEL:-tcg}
VM_TIMEOUT_GIVEN=${VM_TIMEOUT:-}
VM_GUEST_TIMEOUT_GIVEN=${VM_GUEST_TIMEOUT:-}
VM_TIMEOUT=${VM_TIMEOUT:-300}
VM_GUEST_TIMEOUT=${VM_GUEST_TIMEOUT:-$((VM_TIMEOUT > 60 ? VM_TIMEOUT - 30 : VM_TIMEOUT * 3 / 4))}
VM_ONLY=${VM_ONLY:-}
VM_VERBOSE=${VM_VERBOSE:-0}
VM_NO_APT=${VM_NO_APT:-0}
CI=${CI:-}

T_START=$(date +%s.%N)
log() { printf '[vm-test %6.1fs] %s\n' "$(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')" "$*" >&2; }
die() { echo "vm-test: ERROR: $1" >&2; exit "${2:-1}"; }
is_ci() { case "${CI,,}" in 1 | true | yes) return 0 ;; *) return 1 ;; esac; }
skip() {
  if is_ci; then
    echo "vm-test: SKIP is a FAILURE under CI=$CI: $*" >&2
    exit 1
  fi
  echo "vm-test: SKIP: $*" >&2
  exit 77
}

[ "$(uname -m)" = x86_64 ] || skip "host is $(uname -m), need x86_64"

VM_PREP_ONLY=${VM_PREP_ONLY:-0}
# --------------------------------------------------------------- guest inputs
[ "$VM_PREP_ONLY" = 1 ] || {
[ -f "$GUEST_SCRIPT" ] || die "guest script $GUEST_SCRIPT not found" 2
[ -f "$GUEST_BIN" ] || die "guest binary $GUEST_BIN not found (build it with: make vm-prep)" 2
[ -x "$GUEST_BIN" ] || die "guest binary $GUEST_BIN is not executable" 2
if command -v readelf > /dev/null 2>&1; then
  if readelf -lW "$GUEST_BIN" 2> /dev/null | grep -q 'Requesting program interpreter'; then
    die "guest binary $GUEST_BIN is dynamically linked; the guest has no libc. Build with RUSTFLAGS='-C target-feature=+crt-static' --target x86_64-unknown-linux-gnu" 2
  fi
fi
}

mkdir -p "$VM_WORK"/{debs,logs}
VM_WORK=$(cd "$VM_WORK" && pwd)
LOGS=$VM_WORK/logs
# one run at a time per cache dir (shared initramfs/ and logs/)
if command -v flock > /dev/null 2>&1; then
  exec 9> "$VM_WORK/.lock"
  flock -w 900 9 || die "another run-vm-test.sh holds $VM_WORK/.lock"
fi

# ---------------------------------------------------------------- host tools
# command -> Debian package
declare -A TOOL_PKG=(
  [qemu-system-x86_64]=qemu-system-x86 [cpio]=cpio [modinfo]=kmod [xz]=xz-utils
  [make]=make [pahole]=pahole [depmod]=kmod [bc]=bc [gcc]=gcc [gzip]=gzip [dpkg-deb]=dpkg
  [apt-get]=apt [apt-cache]=apt [timeout]=coreutils [readelf]=binutils
)
BUSYBOX=""
find_busybox() {
  local b
  for b in /bin/busybox /usr/bin/busybox; do
    # busybox-static: must be a static binary (the guest has no libc)
    if [ -x "$b" ] && ! readelf -lW "$b" 2> /dev/null | grep -q 'program interpreter'; then
      BUSYBOX=$b
      return 0
    fi
  done
  return 1
}

APT_UPDATED=0
apt_update_once() {
  [ "$APT_UPDATED" = 1 ] && return 0
  log "apt-get update"
  if ! apt-get update > "$LOGS/apt-update.log" 2>&1; then
    tail -5 "$LOGS/apt-update.log" >&2
    return 1
  fi
  APT_UPDATED=1
}

ensure_tools() {
  local missing=() t
  for t in "${!TOOL_PKG[@]}"; do
    command -v "$t" > /dev/null 2>&1 || missing+=("${TOOL_PKG[$t]}")
  done
  find_busybox || missing+=(busybox-static)
  # kernel headers use the exact compiler the kernel was built with (e.g. x86_64-linux-gnu-gcc-12);
  # that is checked after the kernel is resolved.
  [ ${#missing[@]} -eq 0 ] && return 0
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  [ "$VM_NO_APT" = 1 ] && skip "missing host packages (VM_NO_APT=1): ${missing[*]}"
  [ "$(id -u)" = 0 ] || skip "missing host packages and not root to apt-get install them: ${missing[*]}"
  command -v apt-get > /dev/null 2>&1 || skip "missing host packages and no apt-get: ${missing[*]}"
  apt_install "${missing[@]}"
  for t in "${!TOOL_PKG[@]}"; do
    command -v "$t" > /dev/null 2>&1 || skip "still missing $t after apt-get install"
  done
  find_busybox || skip "no static busybox after installing busybox-static"
}

apt_install() {
  log "apt-get install $*"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" > "$LOGS/apt-install.log" 2>&1; then
    apt_update_once || skip "apt-get update failed (no network to the Debian mirror?)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" > "$LOGS/apt-install.log" 2>&1 ||
      skip "apt-get install $* failed (no network?), see $LOGS/apt-install.log"
  fi
}

ensure_tools
[ -e /dev/kvm ] || [ "$VM_ACCEL" != kvm ] || skip "VM_ACCEL=kvm but no /dev/kvm"

# ----------------------------------------------------------- kernel resolution
# A kernel is "ready" in the cache when $VM_WORK/k/<abi>/READY exists: it then
# holds boot/vmlinuz, the decompressed guest modules (+ load order) and mtty.ko.
ready_kernels() { # newest first
  local d
  for d in "$VM_WORK"/k/*/READY; do [ -f "$d" ] && basename "$(dirname "$d")"; done | sort -rV
}

# kver_ok <abi>: 6.x with x >= 7, or >= 7.0 (mtty migration support landed in 6.7)
kver_ok() {
  local maj min
  IFS=. read -r maj min _ <<< "$1"
  [[ $maj =~ ^[0-9]+$ && $min =~ ^[0-9]+$ ]] || return 1
  [ "$maj" -gt 6 ] || { [ "$maj" -eq 6 ] && [ "$min" -ge 7 ]; }
}

# Candidate kernel image packages (generic flavour, >= 6.7), in preference order:
# 6.12 first (newest first), then every other one (newest first). Cheap: no madison.
list_images() {
  apt-cache pkgnames linux-image- 2> /dev/null |
    grep -E '^linux-image-[0-9]+\.[0-9]+[^ ]*-amd64-unsigned$' | grep -vE -- '-(cloud|rt)-amd64' |
    while read -r img; do
      abi=${img#linux-image-}
      abi=${abi%-amd64-unsigned}
      kver_ok "$abi" || continue
      case $abi in 6.12.*) echo "0 $img" ;; *) echo "1 $img" ;; esac
    done | sort -k1,1n -k2,2rV | cut -d' ' -f2
}

# check_image <image-pkg>: prints "abi version mm kbuild-pkg" for the newest version whose
# image/headers/common/kbuild/source packages all exist in that same version.
check_image() {
  local img=$1 abi mm v kb all
  abi=${img#linux-image-}
  abi=${abi%-amd64-unsigned}
  mm=$(cut -d. -f1,2 <<< "$abi")
  all=$(apt-cache madison "$img" "linux-headers-$abi-amd64" "linux-headers-$abi-common" \
    "linux-kbuild-$abi" "linux-kbuild-$mm" "linux-source-$mm" 2> /dev/null | awk -F'|' '{gsub(/ /,"");print $1" "$2}')
  while read -r v; do
    [ -n "$v" ] || continue
    grep -qx "linux-headers-$abi-amd64 $v" <<< "$all" || continue
    grep -qx "linux-headers-$abi-common $v" <<< "$all" || continue
    grep -qx "linux-source-$mm $v" <<< "$all" || continue
    if grep -qx "linux-kbuild-$abi $v" <<< "$all"; then kb=linux-kbuild-$abi
    elif grep -qx "linux-kbuild-$mm $v" <<< "$all"; then kb=linux-kbuild-$mm
    else continue; fi
    echo "$abi $v $mm $kb"
    return 0
  done < <(awk -v p="$img" '$1==p{print $2}' <<< "$all" | sort -rV)
}

# download <pkg> <version> -> prints the .deb path
download() {
  local p=$1 v=$2 f
  f=$(ls "$VM_WORK"/debs/"${p}_${v//:/%3a}"_*.deb 2> /dev/null | head -1 || true)
  if [ -z "$f" ]; then
    log "apt-get download $p=$v"
    (cd "$VM_WORK/debs" && apt-get download "$p=$v") >> "$LOGS/apt-download.log" 2>&1 || {
      apt_update_once && (cd "$VM_WORK/debs" && apt-get download "$p=$v") >> "$LOGS/apt-download.log" 2>&1
    } || return 1
    f=$(ls "$VM_WORK"/debs/"${p}_${v//:/%3a}"_*.deb | head -1)
  fi
  echo "$f"
}

# prepare_kernel <abi> <version> <mm> <kbuild-pkg>: download, unpack, build mtty.ko
# returns 10 on download failure (network), 3 if the kernel is unsuitable; exits on other errors.
# Call it as run_prepare (a subshell with set -e, so any failing step aborts it).
prepare_kernel() {
  local abi=$1 v=$2 mm=$3 kb=$4
  local K=$VM_WORK/k/$abi KVER=$abi-amd64 deb m
  [ -f "$K/READY" ] && return 0
  [ -f "$K/UNSUITABLE" ] && return 3
  log "preparing kernel $KVER ($v)"
  rm -rf "$K" && mkdir -p "$K"/{root,src,mtty,modules}
  local img hdr com kbd srcd
  img=$(download "linux-image-$abi-amd64-unsigned" "$v") || return 10
  # 1. image: only /boot and the module tree (no full install, nothing into the host)
  dpkg-deb -x "$img" "$K/root"
  if ! grep -qE '^CONFIG_VFIO_MDEV=(y|m)' "$K/root/boot/config-$KVER"; then
    echo "kernel $KVER has no CONFIG_VFIO_MDEV" > "$K/UNSUITABLE"
    rm -rf "$K/root"
    return 3
  fi
  hdr=$(download "linux-headers-$abi-amd64" "$v") || return 10
  com=$(download "linux-headers-$abi-common" "$v") || return 10
  kbd=$(download "$kb" "$v") || return 10
  srcd=$(download "linux-source-$mm" "$v") || return 10
  log "unpacking headers"
  for deb in "$hdr" "$com" "$kbd"; do dpkg-deb -x "$deb" "$K/root"; done
  local KH=$K/root/usr/src/linux-headers-$KVER
  # The headers Makefile includes the -common tree by absolute /usr/src path: point it at our copy.
  sed -i "s|^include /usr/src/linux-headers-|include $K/root/usr/src/linux-headers-|" "$KH/Makefile"
  log "extracting samples/vfio-mdev from linux-source-$mm"
  local tarname
  tarname=$(dpkg-deb -c "$srcd" | awk '{print $NF}' | grep -E "linux-source-$mm\.tar\.(xz|bz2|gz)$" | head -1)
  [ -n "$tarname" ] || die "no source tarball in $srcd"
  case $tarname in *.xz) m=J ;; *.bz2) m=j ;; *) m=z ;; esac
  dpkg-deb --fsys-tarfile "$srcd" | tar -xO "$tarname" |
    tar -x$m -C "$K/src" --wildcards "linux-source-$mm/samples/vfio-mdev/*"
  cp "$K/src/linux-source-$mm/samples/vfio-mdev/mtty.c" "$K/mtty/"
  echo 'obj-m := mtty.o' > "$K/mtty/Kbuild"
  # the headers' Makefile wants the compiler the kernel was built with (CONFIG_CC_VERSION_TEXT)
  local ccv
  ccv=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\([^ ]*\) .*/\1/p' "$K/root/boot/config-$KVER")
  if [ -n "$ccv" ] && ! command -v "$ccv" > /dev/null 2>&1; then
    ccv=${ccv#x86_64-linux-gnu-}
    [ "$(id -u)" = 0 ] && [ "$VM_NO_APT" != 1 ] && apt_install "$ccv" || true
  fi
  log "building mtty.ko"
  if ! make -C "$KH" M="$K/mtty" modules > "$LOGS/mtty-build-$abi.log" 2>&1; then
    tail -30 "$LOGS/mtty-build-$abi.log" >&2
    die "mtty.ko build failed for $KVER, see $LOGS/mtty-build-$abi.log"
  fi
  # 2. guest modules: mtty's dependencies (recursively, via modules.dep) + vfio_iommu_type1
  local MD=$K/root/lib/modules/$KVER
  # modules.dep is generated by the kernel postinst (depmod), which we do not run on the host
  depmod -b "$K/root" "$KVER"
  local -A seen=()
  local order=()
  modpath() { # module name -> path relative to $MD (from modules.dep)
    local n=${1//-/_}
    awk -F: -v n="$n" '{ p=$1; b=p; sub(/.*\//,"",b); sub(/\.ko(\.(xz|zst|gz))?$/,"",b); gsub(/-/,"_",b); if (b==n) { print p; exit } }' "$MD/modules.dep"
  }
  visit() { # depth-first: dependencies before the module
    local rel=$1 d
    [ -n "${seen[$rel]:-}" ] && return 0
    seen[$rel]=1
    for d in $(awk -F: -v p="$rel" '$1==p{print $2}' "$MD/modules.dep"); do visit "$d"; done
    order+=("$rel")
  }
  local dep rel
  for dep in $(modinfo -F depends "$K/mtty/mtty.ko" | tr , ' ') vfio_iommu_type1; do
    rel=$(modpath "$dep")
    if [ -z "$rel" ]; then
      # built into the kernel?
      grep -q "/${dep//_/[-_]}.ko" "$MD/modules.builtin" 2> /dev/null && continue
      die "module $dep (needed by mtty) not found in $KVER"
    fi
    visit "$rel"
  done
  : > "$K/modules/order"
  for rel in "${order[@]}"; do
    local base
    base=$(basename "$rel")
    base=${base%.xz}
    base=${base%.zst}
    base=${base%.gz}
    case $rel in
      *.xz) xz -dc "$MD/$rel" > "$K/modules/$base" ;;
      *.zst) zstd -dqc "$MD/$rel" > "$K/modules/$base" ;;
      *.gz) gzip -dc "$MD/$rel" > "$K/modules/$base" ;;
      *) cp "$MD/$rel" "$K/modules/$base" ;;
    esac
    echo "${base%.ko}" >> "$K/modules/order"
  done
  cp "$K/mtty/mtty.ko" "$K/modules/mtty.ko"
  echo mtty >> "$K/modules/order"
  cp "$K/root/boot/vmlinuz-$KVER" "$K/vmlinuz"
  cp "$K/root/boot/config-$KVER" "$K/config"
  echo "$v" > "$K/VERSION"
  # the boot needs only vmlinuz + modules/ (copied above); drop the 400+ MB module tree.
  # The debs stay in $VM_WORK/debs, the headers in root/usr (to rebuild mtty.ko by hand).
  rm -rf "$K/root/lib"
  touch "$K/READY"
  log "kernel $KVER ready: modules $(tr '\n' ' ' < "$K/modules/order")"
}

run_prepare() { # run_prepare abi version mm kbuild -> return code of prepare_kernel
  local rc
  set +e
  (set -e; prepare_kernel "$@")
  rc=$?
  set -e
  case $rc in 0 | 3 | 10) return $rc ;; 77) exit 77 ;; *) rm -rf "$VM_WORK/k/$1"; die "preparing kernel $1 failed (status $rc)" ;; esac
}

T_PREP=$(date +%s.%N)
ABI=""
if [ -n "${VM_KVER:-}" ]; then
  ABI=${VM_KVER%-amd64}
  if [ ! -f "$VM_WORK/k/$ABI/READY" ]; then
    line=$(check_image "linux-image-$ABI-amd64-unsigned")
    [ -n "$line" ] || skip "VM_KVER=$VM_KVER: no matching image/headers/kbuild/source packages in apt"
    # shellcheck disable=SC2086
    rc=0
    run_prepare $line || rc=$?
    [ $rc = 3 ] && die "$(cat "$VM_WORK/k/$ABI/UNSUITABLE")"
    [ $rc = 10 ] && skip "download of kernel $ABI packages failed (no network?)"
  fi
else
  mapfile -t IMGS < <(list_images)
  if [ ${#IMGS[@]} -eq 0 ] && [ "$VM_NO_APT" != 1 ] && [ "$(id -u)" = 0 ] && apt_update_once; then
    mapfile -t IMGS < <(list_images)
  fi
  net_fail=0
  for img in "${IMGS[@]}"; do
    a=${img#linux-image-}
    a=${a%-amd64-unsigned}
    if [ -f "$VM_WORK/k/$a/READY" ]; then ABI=$a; break; fi
    [ -f "$VM_WORK/k/$a/UNSUITABLE" ] && continue
    c=$(check_image "$img")
    [ -n "$c" ] || { log "skipping $img: no matching headers/kbuild/source versions"; continue; }
    # shellcheck disable=SC2086
    rc=0
    run_prepare $c || rc=$?
    [ $rc = 0 ] && { ABI=$a; break; }
    [ $rc = 3 ] && { log "skipping $a: $(cat "$VM_WORK/k/$a/UNSUITABLE")"; continue; }
    net_fail=1
    break
  done
  if [ -z "$ABI" ]; then
    # offline / no apt lists: fall back to whatever kernel is already cached
    ABI=$(ready_kernels | head -1 || true)
    [ -n "$ABI" ] && log "apt resolution failed, using cached kernel $ABI"
  fi
  if [ -z "$ABI" ]; then
    [ $net_fail = 1 ] && skip "could not download kernel packages (no network to the Debian mirror?), see $LOGS/apt-download.log"
    skip "no linux-image-*-amd64-unsigned >= 6.7 with matching headers/kbuild/source (and CONFIG_VFIO_MDEV) in apt (is bookworm-security enabled?)"
  fi
fi
K=$VM_WORK/k/$ABI
log "kernel $ABI-amd64 ($(cat "$K/VERSION")) ready in $(awk -v a="$T_PREP" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s"

# ------------------------------------------------- QEMU 10 for the qemu-interop case
# Debian trixie's qemu-system-x86 and its library closure, from the host's own apt mirror
# (vm/qemu10.sh). Outside CI a failed fetch leaves the case out and says why; under CI it fails.
QEMU10_TREE=""
NOQEMU=""
QEMU_WANTED=0
[[ -z "$VM_ONLY" || " $VM_ONLY " == *" qemu-interop "* ]] && QEMU_WANTED=1
if [ $QEMU_WANTED = 1 ]; then
  T_Q=$(date +%s.%N)
  rc=0
  QEMU10_TREE=$(VM_NO_APT=$VM_NO_APT "$SCRIPT_DIR/qemu10.sh" "$VM_WORK") || rc=$?
  case $rc in
    0) log "QEMU $(cat "$QEMU10_TREE/VERSION") ready in $(awk -v a="$T_Q" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s: $QEMU10_TREE" ;;
    10) NOQEMU="downloading Debian trixie's qemu-system-x86 failed (no network to the mirror?), see $LOGS/qemu10-apt.log" ;;
    3) NOQEMU="no qemu-system-x86 10.x from the host's Debian mirror with suite trixie (see the message above)" ;;
    4) NOQEMU="VM_NO_APT=1 and no QEMU 10 cached in $VM_WORK/qemu10" ;;
    *) die "preparing QEMU 10 failed (vm/qemu10.sh exit $rc)" ;;
  esac
  if [ -n "$NOQEMU" ]; then
    QEMU10_TREE=""
    is_ci && { echo "qemu-interop: FAIL (CI=$CI, the case cannot be skipped): $NOQEMU" >&2; exit 1; }
    log "qemu-interop will not run: $NOQEMU"
  fi
fi

if [ "$VM_PREP_ONLY" = 1 ]; then
  echo "vm-test: prepared kernel $ABI-amd64 in $K"
  exit 0
fi

# ------------------------------------------------------------------ initramfs
IR=$VM_WORK/initramfs
rm -rf "$IR"
mkdir -p "$IR"/{bin,lib/modules,proc,sys,dev,tmp,run}
cp "$BUSYBOX" "$IR/bin/busybox"
cp "$GUEST_BIN" "$IR/bin/vfio-multifd"
chmod 0755 "$IR/bin/vfio-multifd"
install -m 0755 "$GUEST_SCRIPT" "$IR/guest-test.sh"
cp "$K"/modules/*.ko "$K/modules/order" "$IR/lib/modules/"
install -m 0644 "$SCRIPT_DIR/guest-qemu-interop.sh" "$IR/guest-qemu-interop.sh"
if [ -n "$QEMU10_TREE" ]; then
  mkdir -p "$IR/opt"
  cp -a "$QEMU10_TREE" "$IR/opt/qemu10"
fi
cat > "$IR/init" << 'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo "GUEST: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpus, at init after $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /lib/modules/order); do
  if out=$(insmod /lib/modules/$m.ko 2>&1); then echo "GUEST: insmod $m ok"
  else echo "GUEST: insmod $m FAILED: $out"; fi
done
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
[ -n "$VMTEST_ONLY" ] && echo "GUEST: VMTEST_ONLY=$VMTEST_ONLY"
export VMTEST_ONLY VMTEST_NOQEMU
T0=$(cut -d' ' -f1 /proc/uptime)
# guest-test.sh prints to the console and also writes its result line to /tmp/vmtest-result
timeout "${VMTEST_TIMEOUT:-240}" sh /guest-test.sh 2>&1
rc=$?
echo "GUEST: guest-test.sh exit=$rc, uptime ${T0}s -> $(cut -d' ' -f1 /proc/uptime)s"
if ! grep -q '^VMTEST_RESULT:' /tmp/vmtest-result 2>/dev/null; then
  case $rc in
    124 | 137 | 143) why="timed out after ${VMTEST_TIMEOUT:-240}s (exit $rc) without a result line" ;;
    *) why="exited $rc without a result line" ;;
  esac
  echo "VMTEST: FAIL guest-test: $why"
  echo "VMTEST_RESULT: FAIL 0 1"
fi
dmesg | grep -E -i 'mtty|vfio|mdev|BUG:|WARNING:|Oops|Call Trace' | grep -v -e 'module verification failed' -e 'taints kernel' | tail -30 | sed 's/^/GUEST-DMESG: /'
echo "GUEST: powering off"
sync
poweroff -f
EOF
chmod 0755 "$IR/init"
(cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1 > "$VM_WORK/initramfs.cpio.gz")

# ----------------------------------------------------------------------- boot
CONSOLE=$LOGS/console.log
: > "$CONSOLE"
CPU=max
[ "$VM_ACCEL" = kvm ] && CPU=host
# two nested QEMUs (64 MiB guests, TCG) and a 65 MB initramfs need more than the default
MEM=1024
[ -n "$QEMU10_TREE" ] && MEM=2048
# qemu-interop adds 25-45 s under TCG (more when the host is busy): a larger default bound
if [ -n "$QEMU10_TREE" ] && [ -z "$VM_TIMEOUT_GIVEN" ]; then
  VM_TIMEOUT=420
  [ -n "$VM_GUEST_TIMEOUT_GIVEN" ] || VM_GUEST_TIMEOUT=390
fi
APPEND="console=ttyS0 panic=-1 loglevel=4 VMTEST_TIMEOUT=$VM_GUEST_TIMEOUT"
[ -n "$VM_ONLY" ] && APPEND="$APPEND VMTEST_ONLY=${VM_ONLY// /,}"
[ -n "$NOQEMU" ] && APPEND="$APPEND VMTEST_NOQEMU=1"
log "booting $ABI-amd64 (accel=$VM_ACCEL, timeout ${VM_TIMEOUT}s)"
T_BOOT=$(date +%s.%N)
set +e
timeout --kill-after=5 "$VM_TIMEOUT" qemu-system-x86_64 -accel "$VM_ACCEL" -cpu "$CPU" -m "$MEM" -smp 2 \
  -nodefaults -no-user-config -display none -monitor none -serial "file:$CONSOLE" -no-reboot \
  -kernel "$K/vmlinuz" -initrd "$VM_WORK/initramfs.cpio.gz" -append "$APPEND" \
  < /dev/null > "$LOGS/qemu.log" 2>&1
qrc=$?
set -e
T_BOOT_END=$(date +%s.%N)
BOOT_S=$(awk -v a="$T_BOOT" -v b="$T_BOOT_END" 'BEGIN{printf "%.1f", b-a}')
tr -d '\r' < "$CONSOLE" > "$LOGS/console.txt"

if [ "$VM_VERBOSE" = 1 ]; then
  cat "$LOGS/console.txt"
else
  grep -aE '^(VMTEST|GUEST)' "$LOGS/console.txt" || true
fi

# qemu-interop's own verdict line
if [ $QEMU_WANTED = 1 ]; then
  if [ -n "$NOQEMU" ]; then
    echo "qemu-interop: SKIPPED ($NOQEMU)"
  elif grep -aqx 'VMTEST: PASS qemu-interop' "$LOGS/console.txt"; then
    echo "qemu-interop: PASS"
  elif why=$(grep -a '^VMTEST: FAIL qemu-interop: ' "$LOGS/console.txt" | head -1) && [ -n "$why" ]; then
    echo "qemu-interop: FAIL ${why#VMTEST: FAIL qemu-interop: }"
  else
    echo "qemu-interop: FAIL no verdict from the guest (see $LOGS/console.txt)"
  fi
fi

fail() {
  echo "vm-test: FAIL: $*" >&2
  if [ "$VM_VERBOSE" != 1 ] && ! grep -aq '^VMTEST_RESULT: ' "$LOGS/console.txt"; then
    echo "---- last 40 console lines ($LOGS/console.txt) ----" >&2
    tail -40 "$LOGS/console.txt" >&2
    [ -s "$LOGS/qemu.log" ] && { echo "---- qemu stderr ----" >&2; cat "$LOGS/qemu.log" >&2; }
  fi
  exit 1
}
if [ $qrc = 124 ] || [ $qrc = 137 ]; then
  fail "QEMU timed out after ${VM_TIMEOUT}s"
fi
[ $qrc = 0 ] || fail "QEMU exited with status $qrc"
result=$(grep -aE '^VMTEST_RESULT: ' "$LOGS/console.txt" | tail -1 || true)
[ -n "$result" ] || fail "no VMTEST_RESULT line on the guest console (boot failure?)"
log "guest run ${BOOT_S}s (qemu wall), total $(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s"
case $result in
  "VMTEST_RESULT: PASS "*)
    echo "vm-test: PASS ($result, kernel $ABI-amd64, accel=$VM_ACCEL)"
    exit 0
    ;;
  *) fail "$result (kernel $ABI-amd64)" ;;
esac
