#!/bin/bash
# Prepare everything the real-QEMU end-to-end tests (tests/tests/vm.rs) need:
#   - QEMU (qemu-system-x86) and busybox-static from apt, when missing;
#   - Debian cloud kernel 6.1 (required) and 6.12 from bookworm-backports (optional),
#     downloaded and unpacked into .cache/vm/kernel-<kver>/ (never installed);
#   - the static guest program `domsock` (crate domsock-guest), built into target/guest;
#   - the AF_VSOCK shim (target/release/libdomsock_shim.so, crate domsock-shim) and the plain
#     C test program tests/vm/c/vsock-pattern.c (gcc from apt when missing), packed with the
#     dynamic loader and the libraries `ldd` names (LD_PRELOAD needs them in the guest);
#   - the kernel's own AF_VSOCK test suite, tools/testing/vsock/vsock_test, of each kernel
#     series, from the Debian package linux-source-<kver> (the newest the apt archive offers;
#     only tools/testing/vsock/ is unpacked, into .cache/vm/vsock-test-<kver>/), built static
#     with the machine's gcc;
#   - the virtio-net modules, which the vsock_test case loads for its private control link;
#   - one initramfs per kernel: .cache/vm/initramfs-<kver>.cpio.gz.
#
# Idempotent: a kernel is only downloaded again when the archive offers a newer one; the guest
# program and the initramfs images are rebuilt on every run (a few seconds), so re-run this
# after changing guest-driver/ or this script.
#
# Needs root only when something must be installed with apt-get or an apt source must be
# added. Designed for Debian 12 (bookworm) on x86_64.
#
# Environment:
#   DOMSOCK_VM_SKIP_6_12=1   do not try to fetch the optional 6.12 kernel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="$ROOT/.cache/vm"
GUEST_TARGET_DIR="$ROOT/target/guest"
GUEST_BIN="$GUEST_TARGET_DIR/x86_64-unknown-linux-gnu/release/domsock"
SHIM_SO="$ROOT/target/release/libdomsock_shim.so"
C_PATTERN_BIN="$GUEST_TARGET_DIR/vsock-pattern"
BACKPORTS_LIST=/etc/apt/sources.list.d/domsock-bookworm-backports.sources

# Load order that works with busybox insmod (see /work/shared/VM-RECIPE.md). Modules that a
# kernel has built in (virtio, virtio_pci on 6.12) are skipped.
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
    vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport)
# Without these the guest has no vsock at all.
REQUIRED_MODULES=(vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport)
# virtio-net, for the vsock_test case only: vsock_test coordinates its client and server over
# TCP, which runs on a private guest-to-guest Ethernet link (QEMU `-netdev stream` over a Unix
# socket). /init loads these only when asked to (`ds_net=`); 6.12 has dimlib built in.
NET_MODULES=(failover net_failover virtio_net)

log() { echo "setup.sh: $*" >&2; }
warn() { echo "setup.sh: WARNING: $*" >&2; }
die() {
    echo "setup.sh: ERROR: $*" >&2
    exit 1
}

need_root() {
    [ "$(id -u)" -eq 0 ] || die "$1 needs root; re-run as root (sudo $0)"
}

# Exported so the child process fetching the optional kernel does not update again.
export DOMSOCK_APT_UPDATED="${DOMSOCK_APT_UPDATED:-0}"
apt_update_once() {
    if [ "$DOMSOCK_APT_UPDATED" = 0 ]; then
        need_root "apt-get update"
        log "apt-get update"
        apt-get update -qq
        DOMSOCK_APT_UPDATED=1
    fi
}

# --- 1. host packages ---------------------------------------------------------------------
install_packages() {
    local missing=()
    # QEMU 10 from bookworm-backports: QEMU 7.2's TCG (bookworm) crashes the 6.12 guest
    # kernel early in boot in a third to a half of boots (a GPF on iretq in sync_core, or a
    # #DB after cmpxchg16b); 10.0 boots it every time. Measured on these machines, 2026-11.
    if ! qemu_is_recent; then
        add_backports_source || die "QEMU >= $MIN_QEMU_MAJOR needs bookworm-backports"
        apt_update_once
        need_root "installing qemu-system-x86 from bookworm-backports"
        log "apt-get install -t bookworm-backports qemu-system-x86"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -t bookworm-backports qemu-system-x86
        qemu_is_recent || die "qemu-system-x86_64 is still older than $MIN_QEMU_MAJOR after installing"
    fi
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' ||
        missing+=(busybox-static)
    # The C test program of the shim tests (and `strip`, from binutils, which gcc brings).
    command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    if [ "${#missing[@]}" -gt 0 ]; then
        need_root "installing ${missing[*]}"
        apt_update_once
        log "apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    [ -x /bin/busybox ] || die "/bin/busybox missing after installing busybox-static"
    file_is_static /bin/busybox || die "/bin/busybox is not statically linked"
}

MIN_QEMU_MAJOR=10
qemu_is_recent() {
    local v
    v="$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')"
    [ -n "$v" ] && [ "$v" -ge "$MIN_QEMU_MAJOR" ]
}

file_is_static() {
    # A static binary has no PT_INTERP program header. Checked with the ELF header bytes
    # instead of `file`, which a minimal Debian lacks.
    ! LC_ALL=C grep -q -a '/lib64/ld-linux' "$1"
}

# --- 2. kernels ---------------------------------------------------------------------------

# Reads Debian versions on stdin, prints the highest.
highest_version() {
    local best="" v
    while read -r v; do
        [ -n "$v" ] || continue
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best="$v"; fi
    done
    echo "$best"
}

# $1: 6.1 | 6.12. Prints the name of the newest linux-image-<abi>-cloud-amd64 package for that
# kernel series, found through the meta package linux-image-cloud-amd64.
kernel_package_for() {
    local series="$1" versions meta_ver
    if [ "$series" = 6.12 ]; then
        versions="$(apt-cache madison linux-image-cloud-amd64 2>/dev/null | grep bookworm-backports |
            awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep '^6\.12' || true)"
    else
        versions="$(apt-cache madison linux-image-cloud-amd64 2>/dev/null | grep -v backports |
            awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep '^6\.1\.' || true)"
    fi
    meta_ver="$(echo "$versions" | highest_version)"
    [ -n "$meta_ver" ] || return 1
    apt-cache depends "linux-image-cloud-amd64=$meta_ver" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1
}

# Adds the bookworm-backports apt source if no source has it yet; the package lists then need
# an update (done later, once, together with any other update).
add_backports_source() {
    if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || { warn "not root: cannot add the bookworm-backports apt source"; return 1; }
    log "adding apt source $BACKPORTS_LIST"
    cat >"$BACKPORTS_LIST" <<'EOF'
# Added by domsock tests/vm/setup.sh: QEMU 10 and the 6.12 guest kernel (never installed).
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    DOMSOCK_APT_UPDATED=0
}

# $1: series (6.1 | 6.12). Downloads and unpacks the kernel into $CACHE/kernel-<series>/ unless
# the same package is already there. Leaves $CACHE/kernel-<series>/vmlinuz (a symlink), the
# unpacked lib/modules/<release>/ with plain .ko files, and PACKAGE (the package name).
fetch_kernel() {
    local series="$1" dest="$CACHE/kernel-$1" pkg
    pkg="$(kernel_package_for "$series" || true)"
    if [ -z "$pkg" ]; then
        apt_update_once
        pkg="$(kernel_package_for "$series" || true)"
    fi
    [ -n "$pkg" ] || { warn "no linux-image-cloud-amd64 $series found in the apt archive"; return 1; }

    if [ -f "$dest/PACKAGE" ] && [ "$(cat "$dest/PACKAGE")" = "$pkg" ] && [ -e "$dest/vmlinuz" ]; then
        log "kernel $series: $pkg already unpacked"
        return 0
    fi
    log "kernel $series: downloading $pkg"
    local dl="$CACHE/download"
    rm -rf "$dl" && mkdir -p "$dl"
    # apt-get download drops privileges to _apt when it can; a private dir it may write to.
    chmod 0777 "$dl"
    if ! (cd "$dl" && apt-get download -qq "$pkg"); then
        # The package list may be stale (archive moved on): refresh once and retry.
        apt_update_once
        pkg="$(kernel_package_for "$series" || true)"
        [ -n "$pkg" ] || return 1
        (cd "$dl" && apt-get download -qq "$pkg") || { warn "apt-get download $pkg failed"; return 1; }
    fi
    local deb
    deb="$(ls "$dl"/*.deb | head -n1)"
    rm -rf "$dest.new" && mkdir -p "$dest.new"
    dpkg-deb -x "$deb" "$dest.new"
    local vmlinuz
    vmlinuz="$(ls "$dest.new"/boot/vmlinuz-* | head -n1)"
    [ -n "$vmlinuz" ] || { warn "$deb has no boot/vmlinuz-*"; return 1; }
    ln -s "boot/$(basename "$vmlinuz")" "$dest.new/vmlinuz"
    # Modules are unpacked next to the kernel; decompress .ko.xz (busybox insmod wants .ko).
    local f
    find "$dest.new/lib/modules" -name '*.ko.xz' -print0 | while IFS= read -r -d '' f; do
        if command -v xz >/dev/null 2>&1; then xz -d "$f"; else /bin/busybox unxz "$f"; fi
    done
    echo "$pkg" >"$dest.new/PACKAGE"
    rm -rf "$dest" && mv "$dest.new" "$dest"
    rm -rf "$dl"
    log "kernel $series: unpacked $(basename "$deb") into ${dest#"$ROOT"/}"
}

# --- 3. guest program ---------------------------------------------------------------------
build_guest() {
    log "building static guest program (target dir ${GUEST_TARGET_DIR#"$ROOT"/})"
    (cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
        -p domsock-guest --bin domsock --target x86_64-unknown-linux-gnu \
        --target-dir "$GUEST_TARGET_DIR")
    file_is_static "$GUEST_BIN" || die "$GUEST_BIN is not statically linked"
}

# The shim (a cdylib, built like any release artifact of the workspace) and the C program
# that runs under it in the guest.
build_shim_and_c_program() {
    log "building the AF_VSOCK shim (target/release/libdomsock_shim.so)"
    (cd "$ROOT" && cargo build --quiet --release -p domsock-shim)
    log "building tests/vm/c/vsock-pattern.c"
    mkdir -p "$GUEST_TARGET_DIR"
    gcc -O2 -Wall -Wextra -Werror -o "$C_PATTERN_BIN" "$ROOT/tests/vm/c/vsock-pattern.c" -lpthread
}

# --- 3b. the kernel's vsock test suite ----------------------------------------------------
# Each initramfs gets the vsock_test of its own kernel series: the newest linux-source-<series>
# the apt archive offers (6.1 from bookworm, 6.12 from bookworm-security or -backports).
vsock_test_dir() { echo "$CACHE/vsock-test-$1"; }

# $1: series. Prints the newest version of linux-source-<series> the apt lists know.
vsock_test_source_version() {
    apt-cache madison "linux-source-$1" 2>/dev/null |
        awk -F'|' '{gsub(/ /, "", $2); print $2}' | highest_version
}

xz_cat() {
    if command -v xz >/dev/null 2>&1; then xz -dc; else /bin/busybox xzcat; fi
}

# $1: series. Unpacks tools/testing/vsock/ of the newest linux-source-<series> into
# $CACHE/vsock-test-<series>/src, unless that version is there already. The package is
# ~140 MB (the whole kernel tarball); only the test directory and the top Makefile (for the
# version) are unpacked. VERSION records the package version and the kernel version.
fetch_vsock_test_source() {
    local series="$1" pkg="linux-source-$1" dir ver
    dir="$(vsock_test_dir "$series")"
    ver="$(vsock_test_source_version "$series")"
    if [ -z "$ver" ]; then
        apt_update_once
        ver="$(vsock_test_source_version "$series")"
    fi
    [ -n "$ver" ] || { warn "no $pkg in the apt archive"; return 1; }
    if [ -f "$dir/PACKAGE" ] && [ "$(cat "$dir/PACKAGE")" = "$pkg=$ver" ] && [ -f "$dir/src/vsock_test.c" ]; then
        log "vsock_test $series: source $pkg $ver already unpacked"
        return 0
    fi
    log "vsock_test $series: downloading $pkg $ver"
    local dl="$CACHE/download-vsock-test-$series"
    rm -rf "$dl" && mkdir -p "$dl"
    chmod 0777 "$dl"
    if ! (cd "$dl" && apt-get download -qq "$pkg=$ver"); then
        apt_update_once
        ver="$(vsock_test_source_version "$series")"
        (cd "$dl" && apt-get download -qq "$pkg=$ver") || { warn "apt-get download $pkg=$ver failed"; return 1; }
    fi
    local deb tarball top
    deb="$(ls "$dl"/*.deb | head -n1)"
    tarball="$(dpkg-deb -c "$deb" | grep -o '\./usr/src/linux-source-[^ ]*\.tar\.xz$' | head -n1)"
    [ -n "$tarball" ] || { warn "$deb holds no /usr/src/linux-source-*.tar.xz"; return 1; }
    top="$(basename "$tarball" .tar.xz)"
    rm -rf "$dl/x" && mkdir -p "$dl/x"
    dpkg-deb --fsys-tarfile "$deb" | tar -xO "$tarball" | xz_cat |
        tar -x -C "$dl/x" --wildcards "$top/tools/testing/vsock/*" "$top/Makefile"
    [ -f "$dl/x/$top/tools/testing/vsock/vsock_test.c" ] || { warn "$tarball has no tools/testing/vsock/vsock_test.c"; return 1; }
    local kver
    kver="$(awk -F' = ' '/^VERSION =/{v=$2} /^PATCHLEVEL =/{p=$2} /^SUBLEVEL =/{s=$2} END{print v"."p"."s}' "$dl/x/$top/Makefile")"
    rm -rf "$dir.new" && mkdir -p "$dir.new"
    mv "$dl/x/$top/tools/testing/vsock" "$dir.new/src"
    echo "$pkg=$ver" >"$dir.new/PACKAGE"
    echo "$pkg $ver (Linux $kver tools/testing/vsock)" >"$dir.new/VERSION"
    rm -rf "$dir" && mv "$dir.new" "$dir"
    rm -rf "$dl"
    log "vsock_test $series: unpacked $(cat "$dir/VERSION") into ${dir#"$ROOT"/}/src"
}

# $1: series. Builds $CACHE/vsock-test-<series>/vsock_test from the unpacked source, static,
# from the objects its Makefile lists and with its CFLAGS. The source is not modified; two
# flags stand in for the kernel tree's tools/include/linux/kernel.h (not unpacked: it pulls
# in much of tools/include), which the sources include for ARRAY_SIZE (and, in 6.12, get
# `bool` through): the system's <linux/kernel.h> has neither. Everything else comes from the
# system headers (linux-libc-dev has <linux/vm_sockets.h>).
build_vsock_test() {
    local dir src objs bin
    dir="$(vsock_test_dir "$1")"
    src="$dir/src"
    bin="$dir/vsock_test"
    objs="$(sed -n 's/^vsock_test: *//p' "$src/Makefile")"
    [ -n "$objs" ] || die "no vsock_test rule in $src/Makefile"
    log "vsock_test $1: building $(cat "$dir/VERSION") from ${objs//.o/.c}"
    rm -f "$bin.new"
    local o files=()
    for o in $objs; do files+=("$src/${o%.o}.c"); done
    # getaddrinfo in a static glibc program warns at link time; the test only ever resolves
    # numeric addresses and ports, which need no NSS module at run time.
    gcc -O2 -Werror -Wall -I"$src" -Wno-pointer-sign -fno-strict-overflow -fno-strict-aliasing \
        -fno-common -U_FORTIFY_SOURCE -D_GNU_SOURCE \
        -include stdbool.h '-DARRAY_SIZE(a)=(sizeof(a) / sizeof((a)[0]))' \
        -static -o "$bin.new" "${files[@]}" 2>&1 |
        grep -v -e "getaddrinfo' in statically linked" -e 'in function .control_init' >&2 || true
    [ -x "$bin.new" ] || die "building vsock_test $1 failed"
    file_is_static "$bin.new" || die "$bin.new is not statically linked"
    mv "$bin.new" "$bin"
}

# $1: series. Fetches and builds the vsock_test of that series.
prepare_vsock_test() {
    fetch_vsock_test_source "$1" || die "could not fetch the vsock_test source of $1"
    build_vsock_test "$1"
}

# $1: stage dir, $2...: dynamic ELF files. Copies the loader and every library `ldd` names
# into the stage at their host paths (symlinks resolved).
copy_shared_libs() {
    local stage="$1" lib
    shift
    for lib in $(ldd "$@" | grep -o '/[^ ]*' | sort -u); do
        [ -e "$lib" ] || continue
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done
}

# --- 4. initramfs -------------------------------------------------------------------------
# $1: series. Builds $CACHE/initramfs-<series>.cpio.gz.
build_initramfs() {
    local series="$1" kdir="$CACHE/kernel-$1" stage="$CACHE/stage-$1"
    local moddir
    moddir="$(ls -d "$kdir"/lib/modules/*/ | head -n1)"
    moddir="${moddir%/}"
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,dev,proc,sys,tmp,modules}

    cp /bin/busybox "$stage/bin/busybox"
    local applet
    for applet in $(/bin/busybox --list); do
        [ "$applet" = busybox ] || ln -s busybox "$stage/bin/$applet"
    done
    cp "$GUEST_BIN" "$stage/bin/domsock"
    cp "$ROOT/tests/vm/init.sh" "$stage/init"
    chmod 0755 "$stage/init" "$stage/bin/domsock"
    # The shim and its C test program, with what the dynamic loader needs for them.
    mkdir -p "$stage/lib"
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug -o "$stage/lib/libdomsock_shim.so" "$SHIM_SO"
    else
        cp "$SHIM_SO" "$stage/lib/libdomsock_shim.so"
    fi
    cp "$C_PATTERN_BIN" "$stage/bin/vsock-pattern"
    [ -x "$(vsock_test_dir "$series")/vsock_test" ] || prepare_vsock_test "$series"
    cp "$(vsock_test_dir "$series")/vsock_test" "$stage/bin/vsock_test"
    cp "$(vsock_test_dir "$series")/VERSION" "$stage/vsock_test.version"
    copy_shared_libs "$stage" "$SHIM_SO" "$C_PATTERN_BIN"

    local m path order=()
    for m in "${MODULES[@]}"; do
        path="$(find "$moddir/kernel" -name "$m.ko" | head -n1)"
        if [ -n "$path" ]; then
            cp "$path" "$stage/modules/$m.ko"
            order+=("$m")
        elif grep -qs "/$m.ko" "$moddir/modules.builtin"; then
            log "kernel $series: $m is built in"
        elif printf '%s\n' "${REQUIRED_MODULES[@]}" | grep -qx "$m"; then
            die "kernel $series: module $m not found under $moddir"
        else
            log "kernel $series: module $m not found, assuming built in"
        fi
    done
    printf '%s\n' "${order[@]}" >"$stage/modules/order"
    # The virtio-net modules, in their own directory (loaded only for `ds_net=`).
    local net_order=()
    mkdir -p "$stage/modules/net"
    for m in "${NET_MODULES[@]}"; do
        path="$(find "$moddir/kernel" -name "$m.ko" | head -n1)"
        if [ -n "$path" ]; then
            cp "$path" "$stage/modules/net/$m.ko"
            net_order+=("$m")
        elif ! grep -qs "/$m.ko" "$moddir/modules.builtin"; then
            die "kernel $series: module $m not found under $moddir"
        fi
    done
    printf '%s\n' "${net_order[@]}" >"$stage/modules/net/order"
    basename "$moddir" >"$stage/modules/kernel-release"

    local out="$CACHE/initramfs-$series.cpio.gz"
    (cd "$stage" && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 >"$out.new")
    mv "$out.new" "$out"
    rm -rf "$stage"
    log "initramfs $series: ${out#"$ROOT"/} ($(du -h "$out" | cut -f1), modules: ${order[*]}; net: ${net_order[*]}; vsock_test: $(cat "$(vsock_test_dir "$series")/VERSION"))"
}

main() {
    mkdir -p "$CACHE"
    if [ "${1:-}" = --optional-kernel ]; then
        # Runs as a child process so that any failure here (set -e) cannot fail the whole setup.
        grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ ||
            die "no bookworm-backports apt source"
        fetch_kernel "$2"
        prepare_vsock_test "$2"
        build_initramfs "$2"
        return 0
    fi
    if [ "${1:-}" = --initramfs-only ]; then
        build_initramfs "$2"
        return 0
    fi

    add_backports_source || true
    install_packages
    fetch_kernel 6.1
    build_guest
    build_shim_and_c_program
    prepare_vsock_test 6.1
    build_initramfs 6.1

    if [ "${DOMSOCK_VM_SKIP_6_12:-0}" = 1 ]; then
        log "DOMSOCK_VM_SKIP_6_12=1: not fetching kernel 6.12"
        # Keep an already unpacked 6.12 usable with the current guest program.
        if [ -e "$CACHE/kernel-6.12/vmlinuz" ]; then build_initramfs 6.12; else rm -f "$CACHE/initramfs-6.12.cpio.gz"; fi
    elif ! "$BASH" "$ROOT/tests/vm/setup.sh" --optional-kernel 6.12; then
        if [ -e "$CACHE/kernel-6.12/vmlinuz" ] &&
            "$BASH" "$ROOT/tests/vm/setup.sh" --initramfs-only 6.12; then
            warn "could not refresh kernel 6.12; using the one unpacked earlier"
        else
            rm -f "$CACHE/initramfs-6.12.cpio.gz"
            warn "kernel 6.12 from bookworm-backports unavailable; only the 6.1 VM tests will run"
        fi
    fi
    log "done. Run: cargo build --release -p domsock-host && cargo test --release -p domsock-tests --test vm"
}

main "$@"
