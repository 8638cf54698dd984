#!/bin/bash
# qemu10.sh - fetch, cache and unpack Debian trixie's QEMU 10 (qemu-system-x86 and its library
# closure) for the VM test's qemu-interop case, without installing anything into the host.
#
# Usage: vm/qemu10.sh VM_WORK
#   prints the prepared tree on stdout (VM_WORK/qemu10/<version>/tree), progress on stderr.
#
# The tree holds bin/qemu-system-x86_64, lib/ (the binary's DT_NEEDED closure and the trixie
# ld-linux-x86-64.so.2, since QEMU 10 needs glibc >= 2.38), share/bios-256k.bin (seabios) and
# `qemu`, a wrapper that starts the binary through that ld-linux with --library-path.
#
# Package source: the machine's own apt configuration. The Debian entry of the host's release
# (from `apt-get indextargets`) gives the mirror; the same mirror with suite `trixie` goes into
# an alternate sources list under VM_WORK/qemu10/apt, with its own lists, cache and an empty
# dpkg status, so the host's apt state is never touched. The packages are only downloaded
# (`apt-get install --download-only` against the empty status resolves the whole closure)
# and unpacked with `dpkg -x`; no maintainer script runs.
#
# Cache: VM_WORK/qemu10/<version>/READY marks a ready tree; with one present nothing is
# downloaded (the newest ready version is used). Delete VM_WORK/qemu10 to start over.
#
# Exit status: 0 ready; 10 the download failed (no network to the mirror?); 3 no usable
# QEMU 10 in trixie (or no Debian entry in the host's apt sources); 4 nothing cached and
# VM_NO_APT=1; 1 other errors.
# Environment: QEMU10_SUITE (default trixie), QEMU10_REFRESH=1 (ignore the cache),
# VM_NO_APT=1 (use the cache only).
set -euo pipefail

VM_WORK=${1:?usage: qemu10.sh VM_WORK}
SUITE=${QEMU10_SUITE:-trixie}
Q=$VM_WORK/qemu10
LOG=$VM_WORK/logs/qemu10-apt.log
mkdir -p "$Q" "$VM_WORK/logs"
say() { echo "qemu10: $*" >&2; }

if [ "${QEMU10_REFRESH:-0}" != 1 ]; then
  for r in $(ls -d "$Q"/*/READY 2> /dev/null | sort -rV); do
    echo "$(dirname "$r")/tree"
    exit 0
  done
fi

if [ "${VM_NO_APT:-0}" = 1 ]; then
  say "VM_NO_APT=1 and no QEMU 10 in the cache ($Q)"
  exit 4
fi

# ---------------------------------------------------- alternate apt configuration
# The host's Debian mirror: the entry whose release is the host's own codename.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
mirror=$(apt-get indextargets --format '$(REPO_URI)|$(RELEASE)|$(ORIGIN)|$(COMPONENT)' 'Identifier: Packages' 2> /dev/null |
  awk -F'|' -v c="$codename" '$2 == c && $3 == "Debian" && $4 == "main" { print $1; exit }')
if [ -z "$mirror" ]; then
  say "no Debian 'main' entry for release '$codename' in the host's apt sources (apt-get indextargets)"
  exit 3
fi
A=$Q/apt
mkdir -p "$A"/{lists/partial,cache/archives/partial,etc/preferences.d}
: > "$A/status"
# Only the Packages index: the host's apt.conf.d may ask for more (DEP-11, Contents).
echo "deb [target=Packages] $mirror $SUITE main" > "$A/etc/sources.list"
APT=(-o "Dir::Etc::sourcelist=$A/etc/sources.list" -o "Dir::Etc::sourceparts=-"
  -o "Dir::Etc::preferencesparts=$A/etc/preferences.d" -o "Dir::State::lists=$A/lists"
  -o "Dir::State::status=$A/status" -o "Dir::Cache=$A/cache" -o "Dir::Cache::archives=$A/cache/archives"
  -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1")
say "apt-get update: $mirror $SUITE main (alternate list in $A)"
if ! apt-get "${APT[@]}" update > "$LOG" 2>&1; then
  tail -3 "$LOG" >&2
  exit 10
fi
ver=$(apt-cache "${APT[@]}" policy qemu-system-x86 2> /dev/null | awk '/Candidate:/ { print $2 }')
case $ver in
  1:10.*) ;;
  *)
    say "trixie's qemu-system-x86 candidate is '${ver:-none}', not 10.x"
    exit 3
    ;;
esac
say "qemu-system-x86 $ver: downloading its closure"
if ! apt-get "${APT[@]}" install -y --download-only --no-install-recommends "qemu-system-x86=$ver" >> "$LOG" 2>&1; then
  tail -3 "$LOG" >&2
  exit 10
fi

# ---------------------------------------------------- unpack and build the tree
V=$Q/${ver//:/_}
rm -rf "$V"
mkdir -p "$V"/{root,tree/bin,tree/lib,tree/share}
n=0
for deb in "$A"/cache/archives/*.deb; do
  dpkg -x "$deb" "$V/root"
  n=$((n + 1))
done
say "unpacked $n packages into $V/root"
R=$V/root
LIBDIRS=("$R/usr/lib/x86_64-linux-gnu" "$R/lib/x86_64-linux-gnu" "$R/usr/lib64" "$R/lib64")
find_lib() {
  local d
  for d in "${LIBDIRS[@]}"; do [ -e "$d/$1" ] && { echo "$d/$1"; return 0; }; done
  return 1
}
# DT_NEEDED closure of the binary, breadth first
declare -A seen=()
queue=("$R/usr/bin/qemu-system-x86_64")
while [ ${#queue[@]} -gt 0 ]; do
  f=${queue[0]}
  queue=("${queue[@]:1}")
  for lib in $(readelf -dW "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    [ -n "${seen[$lib]:-}" ] && continue
    seen[$lib]=1
    p=$(find_lib "$lib") || { say "library $lib (needed by $(basename "$f")) is in no unpacked package"; exit 1; }
    cp -L "$p" "$V/tree/lib/$lib"
    queue+=("$p")
  done
done
ld=$(find_lib ld-linux-x86-64.so.2) || { say "no ld-linux-x86-64.so.2 in the unpacked libc6"; exit 1; }
cp -L "$ld" "$V/tree/lib/ld-linux-x86-64.so.2"
cp -L "$R/usr/bin/qemu-system-x86_64" "$V/tree/bin/"
cp -L "$R/usr/share/seabios/bios-256k.bin" "$V/tree/share/"
cat > "$V/tree/qemu" << 'EOF'
#!/bin/sh
# Debian trixie's qemu-system-x86_64 through its own ld-linux (the guest has no libc).
d=$(cd "$(dirname "$0")" && pwd)
exec "$d/lib/ld-linux-x86-64.so.2" --library-path "$d/lib" "$d/bin/qemu-system-x86_64" -L "$d/share" "$@"
EOF
chmod 0755 "$V/tree/qemu"
echo "$ver" > "$V/tree/VERSION"
# the full unpacked root is only needed to build the tree; the debs stay in the apt cache
rm -rf "$R"
say "tree ready: ${#seen[@]} libraries, $(du -sh "$V/tree" | cut -f1)"
touch "$V/READY"
echo "$V/tree"
