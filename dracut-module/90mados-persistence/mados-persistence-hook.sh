#!/bin/sh
# dracut pre-pivot hook: layer persistence over the live root. Never fails
# the boot: mados-persistence falls back to RAM mode by itself.
# shellcheck source=/dev/null
command -v warn >/dev/null || . /lib/dracut-lib.sh
# ext4 loaded now, from the initramfs: `mados-persistence enable` in a RAM
# session mounts the new partition after the switch to the live root, which
# may not be able to load modules itself (a RAM boot never mounted ext4)
modprobe -q ext4 2>/dev/null || :
# shellcheck disable=SC2154 # NEWROOT is set by dracut
mados-persistence boot --root "${NEWROOT:-/sysroot}" ||
    warn "mados-persistence exited with $?; the boot goes on without persistence"

# The shutdown initramfs. At poweroff and reboot systemd-shutdown returns
# into /run/initramfs when it holds an executable `shutdown`, and only then
# is the persistence partition unmounted cleanly: the overlays over /usr
# and /etc hold it until systemd-shutdown leaves the live root (README, "At
# shutdown"). dracut fills /run/initramfs at shutdown with
# dracut-shutdown.service, which unpacks the image from /boot or
# /lib/modules/$(uname -r), and a live root carries none: it finds nothing
# and the partition is left needing journal recovery. So, as mkinitcpio's
# `shutdown` hook does, this initramfs is copied there now, with the
# /shutdown of dracut's `shutdown` module and without the kernel modules;
# dracut-shutdown.service then skips (ConditionPathExists=
# !/run/initramfs/bin/sh). Only when persistence is in use: a RAM boot
# leaves nothing of ours mounted and keeps the RAM.
mados_shutdown_initramfs() {
    grep -q '"mode": "persistent"' /run/mados-persistence/state.json 2>/dev/null || return 0
    [ -e /run/initramfs/bin/sh ] && return 0
    if [ ! -x /shutdown ]; then
        warn "mados-persistence: no /shutdown in this initramfs (dracut's shutdown module left out): the stick is not unmounted cleanly at poweroff"
        return 0
    fi
    mkdir -p /run/initramfs
    # (the modules are copied, then removed: udev may still load some from
    # this initramfs until the switch)
    if cp -ax /. /run/initramfs/; then
        rm -rf --one-file-system /run/initramfs/usr/lib/modules
        [ -L /run/initramfs/lib ] || rm -rf --one-file-system /run/initramfs/lib/modules
        # dracut's own init (not its systemd flavour) mounts /run noexec,
        # and systemd-shutdown takes /run/initramfs/shutdown only if
        # access(X_OK) allows it: /run/initramfs becomes a mount of its
        # own that allows exec (recursive: dmsquash-live's mounts below
        # it, the ISO at /run/initramfs/live, stay in view)
        if [ ! -x /run/initramfs/shutdown ] && ! {
            mount --rbind /run/initramfs /run/initramfs && mount -o remount,bind,exec /run/initramfs
        }; then
            warn "mados-persistence: /run is noexec and /run/initramfs could not be made executable: the stick is not unmounted cleanly at poweroff"
        fi
    else
        warn "mados-persistence: copying the initramfs to /run/initramfs failed (full?): the stick is not unmounted cleanly at poweroff"
        # what came from / goes; dracut's own entries there (live, log) stay
        for e in /* /.[!.]*; do
            [ -e "$e" ] || [ -L "$e" ] || continue
            rm -rf --one-file-system "/run/initramfs/${e#/}"
        done
    fi
}
mados_shutdown_initramfs
