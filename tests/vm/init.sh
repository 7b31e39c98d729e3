#!/bin/sh
# /init of the domsock test guests (packed into the initramfs by tests/vm/setup.sh).
#
# The host test passes what to do as kernel parameters; the kernel hands unknown
# `name=value` parameters to /init as environment variables:
#   ds_cmd0, ds_cmd1, ...  `domsock` guest program invocations, run in order. Kernel
#                          parameters cannot contain spaces, so `~` separates the words:
#                          ds_cmd0=send~--cid~2~--port~5000. A command whose first word is
#                          `bg` runs in the background (its exit status is collected at the
#                          end). A command whose first word is `xfail` must fail: its
#                          failure is expected and does not stop the sequence, its success
#                          does (a DS-ERROR line, and the final status is 1). The first
#                          failing foreground command stops the sequence.
#                          A command whose first (or, after `bg`/`xfail`, second) word is
#                          `run` runs the rest as any program instead of `domsock`:
#                          ds_cmd1=run~env~LD_PRELOAD=/lib/libdomsock_shim.so~vsock-pattern~..
#   ds_net=<ipv4>          load the virtio-net modules and bring up lo and eth0 with
#                          <ipv4>/24 (the vsock_test case: its control channel is TCP, over
#                          a private guest-to-guest Ethernet link; see tests/tests/vm.rs).
#   ds_after=poweroff      what to do afterwards: poweroff (default), reboot (`reboot -f`; the
#                          next boot runs the same commands again), or hold (keep running
#                          until the host kills QEMU).
# The kernel passes at most 32 environment variables to init, so keep to ~20 commands.
#
# Everything goes to the serial console. Marker lines for the host, one per line:
#   DS-BOOT boot_id=<uuid> kernel=<release>
#   DS-BEGIN i=<n> <command>          DS-END i=<n> rc=<status>
#   DS-DONE rc=<first non-zero status or 0>
# plus the DS-READY / DS-RESULT / DS-ERROR lines the guest program prints itself.
export PATH=/bin
set -f # command words are split on spaces below; never glob them
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

echo "DS-BOOT boot_id=$(cat /proc/sys/kernel/random/boot_id) kernel=$(uname -r)"

rc=0
for m in $(cat /modules/order); do
    if ! insmod "/modules/$m.ko"; then
        echo "DS-ERROR cmd=init msg=insmod-$m-failed"
        rc=1
    fi
done

# The virtio transport binds to the device a few ms after insmod; wait for the guest CID.
if [ "$rc" -eq 0 ]; then
    domsock cid --wait-ms 5000 || rc=$?
fi

if [ "$rc" -eq 0 ] && [ -n "${ds_net:-}" ]; then
    for m in $(cat /modules/net/order); do
        if ! insmod "/modules/net/$m.ko"; then
            echo "DS-ERROR cmd=init msg=insmod-$m-failed"
            rc=1
        fi
    done
    if [ "$rc" -eq 0 ] && ifconfig lo 127.0.0.1 up && ifconfig eth0 "$ds_net" netmask 255.255.255.0 up; then
        echo "DS-NET ip=$ds_net"
    else
        echo "DS-ERROR cmd=init msg=net-setup-failed"
        rc=1
    fi
fi

# `domsock ARGS`, or with a first word `run`, the program the other words name.
runcmd() {
    if [ "$1" = run ]; then
        shift
        "$@"
    else
        domsock "$@"
    fi
}

bg_pids=""
i=0
while [ "$rc" -eq 0 ] && [ "$i" -lt 32 ]; do
    eval "cmd=\${ds_cmd$i:-}"
    [ -n "$cmd" ] || break
    cmd=$(echo "$cmd" | tr '~' ' ')
    set -- $cmd
    if [ "$1" = bg ]; then
        shift
        echo "DS-BEGIN i=$i bg $*"
        runcmd "$@" &
        bg_pids="$bg_pids $!"
    elif [ "$1" = xfail ]; then
        shift
        echo "DS-BEGIN i=$i xfail $*"
        runcmd "$@"
        r=$?
        echo "DS-END i=$i rc=$r xfail=1"
        if [ "$r" -eq 0 ]; then
            echo "DS-ERROR cmd=init msg=command-$i-should-have-failed"
            rc=1
        fi
    else
        echo "DS-BEGIN i=$i $*"
        runcmd "$@"
        r=$?
        echo "DS-END i=$i rc=$r"
        [ "$r" -eq 0 ] || rc=$r
    fi
    i=$((i + 1))
done

# After a failure nothing will serve the background commands any more: stop them.
if [ "$rc" -ne 0 ] && [ -n "$bg_pids" ]; then
    kill $bg_pids 2>/dev/null
fi
for pid in $bg_pids; do
    wait "$pid"
    r=$?
    echo "DS-END pid=$pid rc=$r"
    [ "$rc" -ne 0 ] || rc=$r
done

echo "DS-DONE rc=$rc"
case "${ds_after:-poweroff}" in
reboot) reboot -f ;;
hold)
    echo "DS-HOLD"
    while :; do sleep 3600; done
    ;;
*) poweroff -f ;;
esac
# Only reached if the above failed; with panic=-1 the kernel panic reboots (or exits QEMU).
sleep 1
exit 1
