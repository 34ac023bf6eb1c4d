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
